"""Dynamic execution in one place: how a quantized layer runs in training, in routed
inference and in an exported graph.

- :mod:`.layers`: static and dynamic quantized ``Conv2d``/``Linear`` and their executions.
- :mod:`.fast_dynamic`: the training path with exact gradients, each sample's backward on
  its own branch.
- :mod:`.routing`: routed inference, samples grouped by candidate.
- :mod:`.indexed`: the graph-static form for export, candidates selected by indexing.
- :mod:`.switchable_bn`: one BatchNorm per candidate after a dynamic conv.
"""
