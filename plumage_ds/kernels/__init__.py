"""Pure tensor kernels of the optimizer step (no ``torch.distributed``, nothing above this package).

* :mod:`.adam` — the Adam arithmetic, per tensor and on lists (``_foreach``);
* :mod:`.batched` — same-shape products and decompositions stacked, in-place lifts, finiteness and
  norms of lists, flat packing;
* :mod:`.fused` — the compressed Adam of an ordinary step as one ``torch.compile``d kernel.
"""
