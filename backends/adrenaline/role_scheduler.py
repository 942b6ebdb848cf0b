"""Admission, the offload decision, and the prefill → decode hand-off (BLS, decoupled).

Per request, on a worker thread: pick the KV pool with the offload policy and reserve the
request's blocks, call ``prefill`` (which writes the prompt's K/V into those blocks), and hand
the request on to ``decode`` as this model's one response. Decoupled, so requests waiting for
KV room or for prefill do not hold up the others.

Inputs:  input_ids INT32 [-1], generation_params BYTES [1]  (from preprocessing)
Outputs: input_ids INT32 [-1], generation_params BYTES [1], first_token INT32 [1],
         block_table INT32 [-1], kv_pool BYTES [1]          (to decode)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils
from common import bytes_tensor, engine_config, error_response, inputs_of, log, setup_process, tensor, text_of

from adrenaline_py.engine.admission import Admission, AdmissionTimeout
from adrenaline_py.kv_cache import POOL_NAMES, BlockAllocator
from adrenaline_py.policy import OffloadPolicy
from adrenaline_py.request import GenerationParams, InvalidRequest

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Role:
    def initialize(self, args, config):
        self.engine = e = engine_config(config)
        setup_process("scheduler", e)
        self._allocators: dict[str, BlockAllocator] = {}
        self.admission = Admission(self._allocator, OffloadPolicy(e.offload, e.offload_bound), e.block_size,
                                   e.admission_timeout_s)
        self.pool = ThreadPoolExecutor(max_workers=max(8, 2 * e.max_decode_batch), thread_name_prefix="admit")

    def _allocator(self, name: str) -> BlockAllocator:
        if name not in self._allocators:
            blocks = self.engine.num_decode_blocks if name == "decode" else self.engine.num_executor_blocks
            self._allocators[name] = BlockAllocator.attach(self.engine.run_dir, name, blocks)
        return self._allocators[name]

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._handle, request, request.get_response_sender())
        return None

    def _handle(self, request, sender):
        ticket = None
        try:
            x = inputs_of(request)
            input_ids = x["input_ids"].reshape(-1).astype(np.int32)
            params_json = text_of(x["generation_params"])
            params = GenerationParams.from_json(params_json)
            ticket = self.admission.admit(len(input_ids), params.sampling.max_tokens)
            first = self._prefill(input_ids, ticket, params_json)
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                tensor("input_ids", input_ids, np.int32),
                bytes_tensor("generation_params", params_json),
                tensor("first_token", [first], np.int32),
                tensor("block_table", ticket.block_table, np.int32),
                bytes_tensor("kv_pool", ticket.pool),
            ]), flags=FINAL)
            ticket = None  # decode owns the blocks now
        except (InvalidRequest, AdmissionTimeout) as e:
            sender.send(error_response(str(e)), flags=FINAL)
        except Exception as e:
            log.exception("scheduling failed")
            sender.send(error_response(f"scheduler: {type(e).__name__}: {e}"), flags=FINAL)
        finally:
            if ticket is not None:
                self.admission.release(ticket)

    def _prefill(self, input_ids: np.ndarray, ticket, params_json: str) -> int:
        assert ticket.pool in POOL_NAMES
        response = pb_utils.InferenceRequest(
            model_name="prefill",
            requested_output_names=["first_token"],
            inputs=[
                pb_utils.Tensor("input_ids", input_ids[None, :]),
                pb_utils.Tensor("block_table", np.asarray(ticket.block_table, dtype=np.int32)[None, :]),
                pb_utils.Tensor("kv_pool", np.array([[ticket.pool.encode()]], dtype=np.object_)),
                pb_utils.Tensor("generation_params", np.array([[params_json.encode()]], dtype=np.object_)),
            ],
        ).exec()
        if response.has_error():
            raise RuntimeError(response.error().message())
        return int(pb_utils.get_output_tensor_by_name(response, "first_token").as_numpy().reshape(-1)[0])

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
