"""What trained runs show: the utilization, compression and calibration analysis (Table 5, Figs. 4-7),
the evaluation of a snapshot on a test set, saliency maps (Fig. 6) and the report page."""
