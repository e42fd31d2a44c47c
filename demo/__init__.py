"""The end-to-end demo on the synthetic shapes set (`make demo`, ``python -m demo``), its evaluation with the
shapes oracle and its report."""
