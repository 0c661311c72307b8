"""Simulated (fake-quant) PTQ methods: one module per paper, each a PTQ_METHODS entry."""
