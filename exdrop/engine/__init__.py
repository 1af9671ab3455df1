"""The engine: Caffe's nets on PyTorch. Layer types and their Excitation Backprop rules, the graph,
the solvers, the guided dropouts (functional core and torch.nn modules), snapshots and pretrained
weights, and the Backend interface that the training loop drives."""
