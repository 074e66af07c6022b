"""Evaluation: the MM1 paper's captioning, VQA and multiple-choice metrics (`metrics`), and the
task and prediction files `mm1 eval --score` reads and scores (`tasks`)."""
