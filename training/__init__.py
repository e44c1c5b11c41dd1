"""The trainers' plumbing, kept out of train_ae.py and train_prior.py so that their loops read like the paper:
data streams and model building (ae_setup), validation, saving and --resume of the encoder-demasker run
(ae_run), the prior's banks, conditioning view, saving and --resume (prior_run), run folders and their logs
(runs). Builds on the models, dataprep/ and infra/; the root scripts import it, never the other way round."""
