"""Strategies: how replicas agree on parameters (AllReduce, ParameterServer, Pipeline)."""
