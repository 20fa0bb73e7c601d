"""Small, self-contained experiments that look inside attention by training it from scratch on synthetic tasks
(:mod:`vzoo.experiments.icl_linear`: in-context linear regression with one-layer multi-head softmax attention).
Each module imports torch and matplotlib inside its functions where it can, so importing this package stays light.
"""
