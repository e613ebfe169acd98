"""What the training and inference stages run on: the training loop's pieces (training state,
metrics log, progress, optimizer and learning rate, `training`), whole-image inference and BN
recalibration (`inference`), metrics (`metrics`) and prediction files (`predictions`)."""
