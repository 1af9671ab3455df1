"""exdrop: Excitation Dropout (Zunino et al., IJCV 2021) on Caffe prototxts, run by PyTorch.

prototxt -> :mod:`exdrop.io` -> :class:`exdrop.net.Net` -> :mod:`exdrop.train` (Caffe's
solvers in :mod:`exdrop.solver`) -> run folder. Guided dropout: :mod:`exdrop.functional`
(Eqns 3-4), :mod:`exdrop.eb` (Excitation Backprop rules), :mod:`exdrop.nn` (drop-in modules).
"""
__version__ = "0.1.0"
