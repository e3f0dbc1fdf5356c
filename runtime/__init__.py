"""kiln runtime: load an artifact with the TVM runtime only and generate text.

    from kiln.runtime import load
    s = load("smollm2.kiln")
    ids = s.encode_prompt("Hello", chat=True)
    print(s.generate(ids, max_new_tokens=32).text)
    s.logits(ids)   # float32 [T, vocab], teacher-forced

The step API generate is built from (Session's docstring has more):

    seq = s.add_sequence()
    last = s.prefill(seq, ids)                 # float32 [vocab]
    nxt = s.decode_greedy([seq], [int(last.argmax())])
    s.remove_sequence(seq)

A graph artifact (`kiln compile model.onnx`) loads as a GraphModel:

    m = load("model.kiln")
    outs = m.run({"input_ids": ids})          # {output name: np.ndarray}
"""

from .graph import GraphModel
from .loader import load
from .sampler import SamplingParams
from .session import GenerationResult, Session

__all__ = ["load", "Session", "GraphModel", "SamplingParams", "GenerationResult"]
