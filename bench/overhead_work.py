"""The work every comparison server of bench/protocol_overhead.py runs per
request: tokenize, then the model call (the synthetic compute, or the model's
forward pass), which is timed inside the server. Imported by the BaseManager and HTTP servers and by the
dirty-worker app (bench/dirty_app.py), so each transport serves the same work."""

from __future__ import annotations

import os
import time

import numpy as np


class Work:
    def __init__(self, kind: str, us: int, model_path: str, threads: int, device: str = "cpu"):
        self.kind, self.us = kind, us
        if kind == "model":
            import torch
            from sentence_transformers import SentenceTransformer

            torch.set_num_threads(threads)
            self.torch = torch
            self.model = SentenceTransformer(model_path, device=device).eval()
            # sentence-transformers 6.1 renamed tokenize to preprocess
            self._preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize
        else:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(os.path.join(model_path, "tokenizer.json"))
            self.tok.enable_truncation(max_length=256)

    def __call__(self, texts) -> tuple[np.ndarray, int]:
        """The vectors of ``texts`` and the nanoseconds of the model call alone.

        Tokenizing is not part of the call here, as it is not in the sidecar's
        compute time either: every transport's overhead includes it."""
        if self.kind == "model":
            torch = self.torch
            feats = self._preprocess(texts)
            t0 = time.perf_counter_ns()
            with torch.inference_mode():
                feats = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}
                vecs = self.model(feats)["sentence_embedding"].float().cpu().numpy()
            return vecs, time.perf_counter_ns() - t0
        from sidecar.synthetic import SPIN_TAIL_NS, synthetic_vector

        encs = self.tok.encode_batch(texts)
        t0 = time.perf_counter_ns()
        end = time.monotonic_ns() + self.us * 1000
        vecs = np.stack([synthetic_vector(np.asarray(e.ids), 384) for e in encs])
        left = end - time.monotonic_ns() - SPIN_TAIL_NS
        if left > 0:
            time.sleep(left / 1e9)
        while time.monotonic_ns() < end:
            pass
        return vecs, time.perf_counter_ns() - t0
