"""Real pycaffe behind the same training loop: the build it is imported from, the Backend that runs
it, and the Excitation Backprop hook that hands its Python dropout layers p_EB."""
