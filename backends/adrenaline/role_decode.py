"""Continuous-batching decode (decoupled): the ensemble's streaming step.

`execute` only enqueues: the engine loop (adrenaline_py/engine/decode.py) runs steps in the
background and output threads detokenize and send each request's responses on its own sender.

Inputs (from the scheduler): input_ids INT32 [-1], generation_params BYTES [1],
  first_token INT32 [1], block_table INT32 [-1], kv_pool BYTES [1]
Outputs (per response): text_output BYTES [1] (a delta when streaming),
  num_output_tokens INT32 [1], num_input_tokens INT32 [1], finish_reason BYTES [1]
  ("" until the last response, then "stop" | "length"; failures arrive as errors)
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from common import (
    bytes_tensor,
    device_for,
    dtype_for,
    engine_config,
    error_response,
    inputs_of,
    log,
    setup_process,
    tensor,
    text_of,
)

from adrenaline_py.engine.decode import Sequence
from adrenaline_py.engine.output import ResponseChunk
from adrenaline_py.engine.service import DecodeService
from adrenaline_py.kv_cache import POOL_NAMES, KVPool
from adrenaline_py.loader import build_model, load_checkpoint
from adrenaline_py.request import GenerationParams

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Role:
    def initialize(self, args, config):
        self.engine = e = engine_config(config)
        setup_process("decode", e)
        ckpt = load_checkpoint(e.model)
        self.dtype = dtype_for(e)
        self.config = ckpt.config
        model = build_model(ckpt, self.dtype, device_for(e, e.decode_gpu), e.max_model_len, e.seed)
        ckpt.state_dict = None
        self.pools = {"decode": KVPool.create("decode", ckpt.config, e, self.dtype)}
        self.service = DecodeService(model, ckpt.tokenizer, e, self.dtype, self._pool, self._send)
        self._ids = itertools.count()
        log.info("decode ready (pid %d)", os.getpid())

    def _pool(self, name: str) -> KVPool:
        if name not in self.pools:  # the executor pool, attached when its first request arrives
            self.pools[name] = KVPool.attach(name, self.config, self.engine, self.dtype)
        return self.pools[name]

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                x = inputs_of(request)
                pool = text_of(x["kv_pool"])
                if pool not in POOL_NAMES:
                    raise ValueError(f"kv_pool must be one of {POOL_NAMES}, got {pool!r}")
                seq = Sequence(
                    seq_id=next(self._ids),
                    prompt_ids=x["input_ids"].reshape(-1).tolist(),
                    output_ids=[int(x["first_token"].reshape(-1)[0])],
                    block_table=x["block_table"].reshape(-1).tolist(),
                    pool=pool,
                    params=GenerationParams.from_json(text_of(x["generation_params"])),
                )
                seq.handle = (sender, seq.params.output)
                self._pool(pool)  # attach the executor's pool now: decode frees the request's blocks
            except Exception as e:
                sender.send(error_response(f"decode: bad request: {e}"), flags=FINAL)
                continue
            self.service.add(seq)
        return None

    def _send(self, handle, chunk: ResponseChunk) -> None:
        sender, options = handle
        if chunk.error is not None:
            sender.send(error_response(chunk.error), flags=FINAL)
            return
        outputs = [bytes_tensor("text_output", chunk.text), bytes_tensor("finish_reason", chunk.finish_reason or "")]
        if options.return_num_output_tokens:
            outputs.append(tensor("num_output_tokens", [chunk.num_output_tokens], np.int32))
        if options.return_num_input_tokens:
            outputs.append(tensor("num_input_tokens", [chunk.num_input_tokens], np.int32))
        sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if chunk.is_final else 0)

    def finalize(self):
        self.service.stop()
