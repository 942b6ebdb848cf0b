"""The vLLM backend's client convention (model `vllm_model`) in front of `ensemble`.

Clients written for the vLLM backend (its samples/client.py, genai-perf ``--backend vllm``) send
one prompt per request without a batch dimension: ``text_input``, ``stream``,
``sampling_parameters`` (a JSON object whose values may be strings, or else the request's
``parameters``), ``exclude_input_in_output`` and optional ``return_*`` flags, and read a 1-D
``text_output``. This model turns such a request into an `ensemble` request (BLS, decoupled) and
ensemble's responses into the vLLM backend's: the same engine in the same decode process, at the
cost of one more Triton hop per response (ensemble → here → client). Parsing and the vLLM defaults
live in adrenaline_py/request.py (``client_api`` "vllm").

Cancellation: tritonserver 2.51 cannot cancel a BLS request, so each one carries a random
``client_key``; when this model sees its client gone it sends that key to ensemble as
``cancel_key`` and decode stops the request at its next sweep (0.2 s), freeing its KV blocks.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils
from common import engine_config, error_response, inputs_of, internal_token_tensor, log, setup_process, text_of
from metrics import Sampler

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
UNSUPPORTED_FLAGS = {"return_cumulative_logprob": "log probabilities are not returned",
                     "return_logprobs": "log probabilities are not returned"}
ENSEMBLE_OUTPUTS = ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens"]


class ClientError(Exception):
    """A bad request: the message goes back to the client."""


class _Client:
    """One vLLM-style request in flight. The lock orders the sends with the cancellation poll:
    asking is_cancelled() after the final response crashes tritonserver 2.51."""

    def __init__(self, request, sender) -> None:
        self.request, self.sender = request, sender
        self.lock = threading.Lock()
        self.done = False
        self.cancel_sent = False

    def send(self, response, final: bool) -> None:
        with self.lock:
            if self.done:
                return
            self.done = final
            self.sender.send(response, flags=FINAL if final else 0)


def _scalar(x: dict[str, np.ndarray], name: str, default):
    return x[name].reshape(-1)[0] if name in x else default


class Role:
    def initialize(self, args, config):
        self.engine = e = engine_config(config)
        setup_process("vllm_model", e)
        params = config.get("parameters", {})
        self.target = params.get("ensemble_model", {}).get("string_value") or "ensemble"
        self._active: dict[str, _Client] = {}
        self._active_lock = threading.Lock()
        # One thread per request in flight: each waits on its ensemble stream.
        self._threads = ThreadPoolExecutor(max_workers=e.max_queued_requests + 2 * e.max_decode_batch,
                                           thread_name_prefix="vllm")
        self._sampler = Sampler(self._sweep_cancelled, period_s=0.2)

    def execute(self, requests):
        for request in requests:
            self._threads.submit(self._serve, request, request.get_response_sender())
        return None

    def _parse(self, request) -> tuple[list, bool, bytes | None, dict[str, bool]]:
        """The ensemble inputs; stream; the prompt to put in front of a non-streamed output; flags."""
        x = inputs_of(request)
        if "text_input" not in x:
            raise ClientError("missing required input 'text_input'")
        prompt = _scalar(x, "text_input", b"")
        prompt = prompt if isinstance(prompt, bytes) else str(prompt).encode("utf-8")
        stream = bool(_scalar(x, "stream", False))
        # The vLLM backend's rule: the prompt leads a non-streamed output unless
        # exclude_input_in_output is true; a stream never carries it.
        prepend = not bool(_scalar(x, "exclude_input_in_output", stream))
        if prepend and stream:
            raise ClientError("When streaming, `exclude_input_in_output` = False is not allowed.")
        flags = {name: bool(_scalar(x, name, False)) for name in
                 ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens", *UNSUPPORTED_FLAGS)}
        for name, why in UNSUPPORTED_FLAGS.items():
            if flags[name]:
                raise ClientError(f"{name} is not supported ({why})")
        # As the vLLM backend: the sampling_parameters input, else the request's parameters.
        sampling = text_of(x["sampling_parameters"]) if "sampling_parameters" in x else request.parameters()
        inputs = [
            pb_utils.Tensor("text_input", np.array([[prompt]], dtype=np.object_)),
            pb_utils.Tensor("stream", np.array([[stream]], dtype=bool)),
            pb_utils.Tensor("exclude_input_in_output", np.array([[True]], dtype=bool)),  # the prompt is added here
            pb_utils.Tensor("sampling_parameters", np.array([[sampling.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("client_api", np.array([[b"vllm"]], dtype=np.object_)),
            internal_token_tensor(self.engine),
        ]
        return inputs, stream, prompt if prepend else None, flags

    def _serve(self, request, sender) -> None:
        client = _Client(request, sender)
        try:
            inputs, stream, prefix, flags = self._parse(request)
        except (ClientError, ValueError) as e:
            client.send(error_response(str(e)), final=True)
            return
        key = uuid.uuid4().hex
        inputs.append(pb_utils.Tensor("client_key", np.array([[key.encode()]], dtype=np.object_)))
        with self._active_lock:
            self._active[key] = client
        try:
            bls = pb_utils.InferenceRequest(model_name=self.target, inputs=inputs,
                                            requested_output_names=ENSEMBLE_OUTPUTS)
            for response in bls.exec(decoupled=True):
                if response.has_error():
                    client.send(error_response(response.error().message()), final=True)
                    return
                out = {t.name(): t.as_numpy() for t in response.output_tensors()}
                if not out:  # ensemble's empty first response, or a bare final flag
                    continue
                finish = text_of(out["finish_reason"])
                if finish == "error":  # ensemble's errors to us (role_decode.internal_error_response)
                    message = out["text_output"].reshape(-1)[0]
                    client.send(error_response(message.decode("utf-8", "replace")), final=True)
                    return
                final = bool(finish)
                text = out["text_output"].reshape(-1)[0]
                if final and prefix is not None and not stream:
                    text = prefix + text
                client.send(self._response(text, finish, out, flags), final)
                if final:
                    return
            client.send(error_response("ensemble ended the request without a final response"), final=True)
        except Exception as e:
            log.exception("vllm_model request failed")
            client.send(error_response(f"vllm_model: {type(e).__name__}: {e}"), final=True)
        finally:
            with self._active_lock:
                self._active.pop(key, None)

    @staticmethod
    def _response(text: bytes, finish: str, out: dict[str, np.ndarray], flags: dict[str, bool]):
        """The vLLM backend's outputs: 1-D, one entry per sequence (here always one)."""
        tensors = [pb_utils.Tensor("text_output", np.array([text], dtype=np.object_))]
        if flags["return_finish_reason"]:  # str(None) on unfinished responses, as vLLM's backend sends
            tensors.append(pb_utils.Tensor("finish_reason", np.array([finish or "None"], dtype=np.object_)))
        if flags["return_num_input_tokens"] and "num_input_tokens" in out:
            tensors.append(pb_utils.Tensor("num_input_tokens", out["num_input_tokens"].reshape(-1).astype(np.uint32)))
        if flags["return_num_output_tokens"] and "num_output_tokens" in out:  # a delta when streaming
            tensors.append(pb_utils.Tensor("num_output_tokens", out["num_output_tokens"].reshape(-1).astype(np.uint32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _sweep_cancelled(self) -> None:
        """Clients that went away: tell decode to stop their requests (it answers on their streams)."""
        with self._active_lock:
            active = list(self._active.items())
        for key, client in active:
            with client.lock:
                gone = not client.done and not client.cancel_sent and client.request.is_cancelled()
                client.cancel_sent |= gone
            if gone:
                cancel = pb_utils.InferenceRequest(model_name=self.target, inputs=[
                    pb_utils.Tensor("cancel_key", np.array([[key.encode()]], dtype=np.object_)),
                    internal_token_tensor(self.engine),
                ], requested_output_names=[])
                for response in cancel.exec(decoupled=True):
                    if response.has_error():
                        log.warning("cancelling %s: %s", key, response.error().message())

    def finalize(self):
        self._sampler.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)
