"""Communication layer: env contract, rendezvous, process groups, wire protocol, channels.

Knows nothing of models or optimizers.
"""
