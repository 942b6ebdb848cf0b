"""The few CUDA driver calls torch does not expose, through ctypes on ``libcuda.so.1``.

Shared GPU memory (adrenaline_py/shm.py) needs:

- plain device memory (``cuMemAlloc``) and its IPC handle, independent of torch's caching
  allocator and of its handle format;
- CUDA IPC opened in the *current* device's context (``cuIpcOpenMemHandle`` with lazy peer access),
  so that a process reaches another GPU's memory through NVLink without a CUDA context on that GPU;
- `tensor_at`: such memory as a torch tensor labelled with the current device (DLPack), so torch
  ops, Triton kernels and graph captures treat it as local;
- peer access between two devices' primary contexts (one process using both GPUs).

The hand-off probe (adrenaline_py/bench_handoff.py) also measures the alternatives it rejected
with ``cuStreamWaitValue32``/``cuStreamWriteValue32`` (stream memory operations), ``cuMemcpyAsync``
between raw addresses and host memory registered with the GPUs.

Nothing here is loaded on a machine without CUDA unless a GPU code path runs.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

import torch

CU_STREAM_WAIT_VALUE_GEQ = 0x0
CU_STREAM_WAIT_VALUE_EQ = 0x1
CU_STREAM_WRITE_VALUE_DEFAULT = 0x0  # a memory barrier first: earlier writes are visible before the value
CU_MEMHOSTREGISTER_PORTABLE = 0x01
CU_MEMHOSTREGISTER_DEVICEMAP = 0x02
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1
_ALREADY_ENABLED = (704,)  # CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
_HOST_MEMORY_ALREADY_REGISTERED = 712

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class CudaDriverError(RuntimeError):
    pass


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


def _symbol(lib: ctypes.CDLL, *names: str):
    for name in names:
        try:
            return getattr(lib, name)
        except AttributeError:
            continue
    raise CudaDriverError(f"libcuda has none of {names}")


def _driver() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL("libcuda.so.1")
            u32, u64, ptr, sz = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t
            sigs = {
                ("cuInit",): [ctypes.c_uint],
                ("cuGetErrorString",): [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
                ("cuStreamWaitValue32_v2", "cuStreamWaitValue32"): [ptr, u64, u32, ctypes.c_uint],
                ("cuStreamWriteValue32_v2", "cuStreamWriteValue32"): [ptr, u64, u32, ctypes.c_uint],
                ("cuMemcpyAsync",): [u64, u64, sz, ptr],
                ("cuMemHostRegister_v2", "cuMemHostRegister"): [ptr, sz, ctypes.c_uint],
                ("cuMemHostUnregister",): [ptr],
                ("cuMemHostGetDevicePointer_v2", "cuMemHostGetDevicePointer"): [
                    ctypes.POINTER(u64), ptr, ctypes.c_uint],
                ("cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle"): [ctypes.POINTER(u64), _IpcHandle, ctypes.c_uint],
                ("cuIpcCloseMemHandle",): [u64],
                ("cuDevicePrimaryCtxRetain",): [ctypes.POINTER(ptr), ctypes.c_int],
                ("cuCtxGetCurrent",): [ctypes.POINTER(ptr)],
                ("cuCtxEnablePeerAccess",): [ptr, ctypes.c_uint],
                ("cuCtxSetCurrent",): [ptr],
                ("cuMemAlloc_v2", "cuMemAlloc"): [ctypes.POINTER(u64), sz],
                ("cuMemFree_v2", "cuMemFree"): [u64],
                ("cuIpcGetMemHandle",): [ctypes.POINTER(_IpcHandle), u64],
            }
            for names, args in sigs.items():
                fn = _symbol(lib, *names)
                fn.argtypes, fn.restype = args, ctypes.c_int
                setattr(lib, "adr_" + names[0].removesuffix("_v2"), fn)
            _check(lib, lib.adr_cuInit(0), "cuInit")
            _lib = lib
    return _lib


def _check(lib: ctypes.CDLL, rc: int, what: str) -> None:
    if rc != 0:
        msg = ctypes.c_char_p()
        lib.cuGetErrorString(rc, ctypes.byref(msg))
        raise CudaDriverError(f"{what} failed: CUDA error {rc} ({(msg.value or b'?').decode()})")


def _stream_handle(stream: torch.cuda.Stream | None) -> ctypes.c_void_p:
    s = stream if stream is not None else torch.cuda.current_stream()
    return ctypes.c_void_p(s.cuda_stream)


def stream_wait_value32(addr: int, value: int, stream: torch.cuda.Stream | None = None,
                        flags: int = CU_STREAM_WAIT_VALUE_EQ) -> None:
    """Work enqueued on ``stream`` after this starts only once the word at ``addr`` satisfies ``flags``."""
    lib = _driver()
    _check(lib, lib.adr_cuStreamWaitValue32(_stream_handle(stream), addr, value, flags), "cuStreamWaitValue32")


def stream_write_value32(addr: int, value: int, stream: torch.cuda.Stream | None = None,
                         flags: int = CU_STREAM_WRITE_VALUE_DEFAULT) -> None:
    """Write ``value`` to ``addr`` once the stream's earlier work is done (and visible, by default)."""
    lib = _driver()
    _check(lib, lib.adr_cuStreamWriteValue32(_stream_handle(stream), addr, value, flags), "cuStreamWriteValue32")


def memcpy_async(dst: int, src: int, nbytes: int, stream: torch.cuda.Stream | None = None) -> None:
    """Copy between device (or registered host) addresses of any GPU on ``stream``; NVLink between peers."""
    if nbytes <= 0:
        return
    lib = _driver()
    _check(lib, lib.adr_cuMemcpyAsync(dst, src, nbytes, _stream_handle(stream)), "cuMemcpyAsync")


def host_register(t: torch.Tensor) -> int:
    """Pin a host tensor's pages for every GPU and return the device address of its first byte."""
    lib = _driver()
    nbytes = t.numel() * t.element_size()
    rc = lib.adr_cuMemHostRegister(ctypes.c_void_p(t.data_ptr()), nbytes,
                                   CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP)
    if rc != _HOST_MEMORY_ALREADY_REGISTERED:
        _check(lib, rc, "cuMemHostRegister")
    dptr = ctypes.c_uint64()
    _check(lib, lib.adr_cuMemHostGetDevicePointer(ctypes.byref(dptr), ctypes.c_void_p(t.data_ptr()), 0),
           "cuMemHostGetDevicePointer")
    return dptr.value


def host_unregister(t: torch.Tensor) -> None:
    lib = _driver()
    lib.adr_cuMemHostUnregister(ctypes.c_void_p(t.data_ptr()))


def make_current(device: int) -> None:
    """Make ``device``'s primary context (the one torch uses) current on this thread."""
    lib = _driver()
    ctx = ctypes.c_void_p()
    _check(lib, lib.adr_cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
    _check(lib, lib.adr_cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def mem_alloc(nbytes: int, device: int) -> int:
    """Plain device memory (cuMemAlloc) on ``device``, outside torch's caching allocator, IPC-exportable."""
    lib = _driver()
    make_current(device)
    ptr = ctypes.c_uint64()
    _check(lib, lib.adr_cuMemAlloc(ctypes.byref(ptr), max(nbytes, 1)), f"cuMemAlloc({nbytes})")
    return ptr.value


def mem_free(ptr: int) -> None:
    lib = _driver()
    lib.adr_cuMemFree(ptr)


def ipc_handle(ptr: int) -> bytes:
    """The 64-byte IPC handle of an allocation made by `mem_alloc`."""
    lib = _driver()
    h = _IpcHandle()
    _check(lib, lib.adr_cuIpcGetMemHandle(ctypes.byref(h), ptr), "cuIpcGetMemHandle")
    return ctypes.string_at(ctypes.addressof(h), 64)


def ipc_open(handle: bytes, device: int) -> int:
    """Map another process's allocation into ``device``'s context (this process's GPU); returns its address.

    For memory on another GPU the driver enables peer access (NVLink) lazily, so this process
    needs no CUDA context on that GPU.
    """
    lib = _driver()
    make_current(device)
    h = _IpcHandle()
    ctypes.memmove(ctypes.byref(h), handle, 64)
    ptr = ctypes.c_uint64()
    _check(lib, lib.adr_cuIpcOpenMemHandle(ctypes.byref(ptr), h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
           "cuIpcOpenMemHandle")
    return ptr.value


def ipc_close(ptr: int) -> None:
    lib = _driver()
    lib.adr_cuIpcCloseMemHandle(ptr)


def enable_peer_access(device: int, peer: int) -> None:
    """Let kernels and copies of ``device``'s primary context reach memory of ``peer`` (idempotent)."""
    if device == peer:
        return
    lib = _driver()
    peer_ctx = ctypes.c_void_p()
    _check(lib, lib.adr_cuDevicePrimaryCtxRetain(ctypes.byref(peer_ctx), peer), "cuDevicePrimaryCtxRetain")
    make_current(device)
    rc = lib.adr_cuCtxEnablePeerAccess(peer_ctx, 0)
    if rc not in (0, *_ALREADY_ENABLED):
        _check(lib, rc, f"cuCtxEnablePeerAccess({device} -> {peer})")


# --- device memory as a torch tensor of the current device (DLPack) ------------------------------

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]
_KDLCUDA = 2
_DL_DTYPES = {torch.bfloat16: (4, 16), torch.float16: (2, 16), torch.float32: (2, 32), torch.float64: (2, 64),
              torch.int32: (0, 32), torch.int64: (0, 64), torch.uint8: (1, 8), torch.int8: (0, 8)}
_keep_alive: dict[int, tuple] = {}  # ctypes objects of each exported tensor, until torch frees it


@_DELETER
def _dl_deleter(managed):  # torch calls this when the tensor's storage goes away
    entry = _keep_alive.pop(ctypes.addressof(managed.contents), None)
    if entry is not None and entry[-1] is not None:
        entry[-1]()


def tensor_at(address: int, shape: tuple[int, ...], dtype: torch.dtype, device: int,
              on_free: Callable[[], None] | None = None) -> torch.Tensor:
    """A contiguous torch tensor over ``address``, labelled ``cuda:<device>`` whatever GPU holds the bytes.

    Memory of another GPU mapped into this device's context (`ipc_open`) becomes an ordinary tensor
    of this device: torch ops and Triton kernels launched here read and write it through NVLink,
    copies into it are same-device copies (capturable, no cross-device events), and this process
    needs no CUDA context on the other GPU. ``on_free`` runs when torch frees the tensor's storage
    (e.g. to unmap or free the memory); otherwise the memory must outlive the tensor.
    """
    code, bits = _DL_DTYPES[dtype]
    ndim = len(shape)
    shape_arr = (ctypes.c_int64 * max(ndim, 1))(*shape)
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    strides_arr = (ctypes.c_int64 * max(ndim, 1))(*reversed(strides))
    managed = _DLManagedTensor()
    managed.dl_tensor = _DLTensor(ctypes.c_void_p(address), _DLDevice(_KDLCUDA, device), ndim,
                                  _DLDataType(code, bits, 1), shape_arr, strides_arr, 0)
    managed.manager_ctx = None
    managed.deleter = _dl_deleter
    _keep_alive[ctypes.addressof(managed)] = (managed, shape_arr, strides_arr, on_free)
    pycapsule_new = ctypes.pythonapi.PyCapsule_New
    pycapsule_new.restype, pycapsule_new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p,
                                                                      ctypes.c_void_p]
    capsule = pycapsule_new(ctypes.addressof(managed), b"dltensor", None)
    return torch.from_dlpack(capsule)
