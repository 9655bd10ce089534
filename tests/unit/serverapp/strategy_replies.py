"""Train replies for the strategy tests: a small model's arrays and a site's reply carrying them."""

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

SHAPES = {"conv.weight": (4, 1, 3, 3, 3), "conv.bias": (4,), "head.weight": (2, 4)}


def _arrays(rng, scale=1.0):
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def _reply(node, name, arrays, count):
    ins = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"loss": 0.5, "num-examples": count}),
            "site": ConfigRecord({"name": name}),
        }
    )
    return Message(content=content, reply_to=ins)
