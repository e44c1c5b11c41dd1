"""One module per figure or table of the paper behind eval.py's subcommands, the marginal trap (App. B), the
reference scorer and the App. H prompted prior's trainer."""
