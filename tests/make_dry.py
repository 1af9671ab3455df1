"""`make -n` output as the shell would read it: the Makefile quotes every value it passes
(`'path with spaces'`), tests look for the words."""
import shlex


def unquoted(text: str) -> str:
    out = []
    for line in text.splitlines():
        try:
            out.append(" ".join(shlex.split(line, posix=True)))
        except ValueError:   # a line the shell reads together with the next (an open quote)
            out.append(line)
    return "\n".join(out) + "\n"
