#!/usr/bin/env bash
# Environment for using the pycaffe built by scripts/build_caffe.sh.
#
#   eval "$(scripts/caffe_env.sh [BUILD_DIR])"   # executed: prints export lines
#   source scripts/caffe_env.sh [BUILD_DIR]      # sourced: exports into the current shell
#
# BUILD_DIR defaults to $EXDROP_CAFFE_DIR, else <repo>/build/caffe. Exports EXDROP_CAFFE_DIR,
# PYTHONPATH (BUILD_DIR/python and <repo>/layers prepended: the ExcitationDropout Python layers,
# so that caffe.Net can open the repository's prototxts and snapshots) and GLOG_minloglevel=2
# (quiet Caffe's logging).
# Exits (or returns) 1 with a message on stderr if pycaffe is not built there.

_exdrop_caffe_env() {
  local repo_root build_dir py_dir
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  build_dir="${1:-${EXDROP_CAFFE_DIR:-$repo_root/build/caffe}}"
  if [[ ! -e "$build_dir/python/caffe/_caffe.so" ]]; then
    echo "caffe_env: pycaffe is not built at $build_dir (run \`make caffe\`)" >&2
    return 1
  fi
  build_dir="$(cd "$build_dir" && pwd)"
  py_dir="$build_dir/python"
  _EXDROP_EXPORTS=(
    "EXDROP_CAFFE_DIR=$build_dir"
    "PYTHONPATH=$py_dir:$repo_root/layers${PYTHONPATH:+:$PYTHONPATH}"
    "GLOG_minloglevel=2"
  )
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  # sourced
  if _exdrop_caffe_env "$@"; then
    for _kv in "${_EXDROP_EXPORTS[@]}"; do export "${_kv?}"; done
    unset _kv _EXDROP_EXPORTS
  else
    unset _EXDROP_EXPORTS
    return 1
  fi
else
  set -euo pipefail
  _exdrop_caffe_env "$@" || exit 1
  for _kv in "${_EXDROP_EXPORTS[@]}"; do
    printf 'export %s=%q\n' "${_kv%%=*}" "${_kv#*=}"
  done
fi
