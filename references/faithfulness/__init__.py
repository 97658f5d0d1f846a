"""Faithfulness: the token-flipping protocol, the tasks and their data, the methods, one case
measured, and the paired statistics of the study."""
