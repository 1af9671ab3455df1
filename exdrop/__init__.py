"""exdrop: Excitation Dropout (Zunino et al., IJCV 2021) on Caffe prototxts, run by PyTorch.

The package, from the bottom up (each layer imports only those below it; `make test` checks it):

- :mod:`exdrop.paths`: where the prototxts and Python layers are;
- :mod:`exdrop.proto`: caffe.proto's classes and the prototxt / caffemodel readers (``proto.io``);
- :mod:`exdrop.data`: Caffe Datum LMDBs, the data set converters, the data layers' batch sources;
- :mod:`exdrop.engine`: the nets on PyTorch, Excitation Backprop, the guided dropouts
  (``exdrop.functional``, ``exdrop.nn``), the solvers, snapshots, the Backend interface;
- :mod:`exdrop.caffe`: real pycaffe as a second backend;
- :mod:`exdrop.run`: the training loop and its run folder;
- :mod:`exdrop.experiments`: prototxt variants, sweeps (Tables 2-4), benches (Table 6);
- :mod:`exdrop.analysis`: utilization, compression, calibration, saliency, the report;
- :mod:`exdrop.cli`: ``python -m exdrop``.
"""
__version__ = "0.1.0"
