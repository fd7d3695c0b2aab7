"""AdamW with blockwise 8-bit states, optionally paged to CUDA managed memory.

Per parameter the state is
  step     float32 scalar on the parameter's device (number of updates taken)
  state1   m: uint8 codes of the signed dynamic map, the parameter's shape
  state2   v: uint8 codes of the unsigned dynamic map
  absmax1  float32 [ceil(numel / 256)]: scale of each 256-element block of m
  absmax2  float32 [ceil(numel / 256)]: same for v
Parameters with fewer than `min_8bit_size` elements keep float32 m and v in
state1/state2 and empty absmax tensors. state_dict() holds exactly these
tensors; load_state_dict() copies them onto each parameter's device (and into
managed memory for the paged optimizer), so a saved state moves freely between
CPU and CUDA and between AdamW8bit and PagedAdamW8bit.

Math (one fused op per parameter group and device -- a CUDA step of large
parameters in a few calls of growing size, see _call_slices --
csrc/core/adamw8bit.h):
torch.optim.AdamW's order -- decoupled decay first, p *= 1 - lr*wd -- then
the update in SPEC's (bnb's) form, one division per element:
p -= lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps*sqrt(1-b2^t)), the same
quantity as torch's lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps) --
with m and v dequantized per block before and re-quantized (nearest map entry,
new block absmax) after. A non-finite gradient element leaves its parameter
and both states unchanged.
"""
import copy
import math
import numbers
import sys
from collections import defaultdict
from itertools import chain
from typing import Iterable

import torch

from .. import functional, ops

# The op itself: ops.adamw8bit_step copies its seven lists first, which the
# optimizer's own lists do not need.
_adamw8bit_step = torch.ops.lowbit.adamw8bit_step.default

BLOCKSIZE = 256
_STATE_KEYS = ("step", "state1", "state2", "absmax1", "absmax2")

# The GPU starts on a step only once the op is entered, and entering it costs
# over a microsecond of host time per parameter (mostly the dispatcher
# converting the op's seven lists). A CUDA step is therefore split into calls
# of growing size: the first ends once it holds _FIRST_CALL_ELEMS elements
# (~0.1 ms of work on an H100), each next one once it holds _CALL_GROWTH times
# the elements of the one before, so the GPU works while the host prepares the
# next call. 256 tensors of 4M elements go out as 4 + 32 + 220, the 448 LoRA
# adapters of a 7B model as two calls (the host-bound step then ends with the
# second call's work only), a group of under 2^24 elements in one call.
_FIRST_CALL_ELEMS = 1 << 24
_CALL_GROWTH = 8


def _is_dtensor(t: torch.Tensor) -> bool:
    # Without torch.distributed.tensor imported there can be no DTensor; this
    # keeps `import lowbit` from importing it.
    dt = sys.modules.get("torch.distributed.tensor")
    return dt is not None and isinstance(t, dt.DTensor)


def _split_calls(device: torch.device) -> bool:
    # On the CPU the op runs synchronously: nothing to overlap.
    return device.type == "cuda"


def _call_slices(numels: list) -> list:
    """(start, end) of each op call over one device's parameter list."""
    n = len(numels)
    slices, start, acc, budget = [], 0, 0, _FIRST_CALL_ELEMS
    for i, k in enumerate(numels):
        acc += k
        if acc >= budget and i + 1 < n:
            slices.append((start, i + 1))
            start, budget, acc = i + 1, acc * _CALL_GROWTH, 0
    slices.append((start, n))
    return slices


def _zero_code(signed: bool) -> int:
    """Index of 0.0 in the dynamic map: the code of an all-zero state."""
    return int(functional.get_dynamic_map(signed, "cpu").abs().argmin())


def _check_hyper(where: str, lr, betas, eps, weight_decay):
    for name, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not isinstance(v, (numbers.Real, torch.Tensor)) or isinstance(v, bool) or \
                (isinstance(v, torch.Tensor) and name != "lr"):
            raise TypeError(f"{where}: {name} must be a number{' or a scalar tensor' if name == 'lr' else ''}, "
                            f"got {type(v).__name__} {v!r}")
    if not isinstance(lr, torch.Tensor) and not lr >= 0.0:
        raise ValueError(f"{where}: lr must be >= 0, got {lr}")
    if isinstance(lr, torch.Tensor) and (lr.numel() != 1 or not lr.is_floating_point()):
        raise ValueError(f"{where}: a tensor lr must be a floating-point scalar, got shape {tuple(lr.shape)} "
                         f"dtype {lr.dtype}")
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}") from None
    for name, b in (("betas[0]", b1), ("betas[1]", b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{where}: {name} must be in [0, 1), got {b}")
    if not eps >= 0.0:
        raise ValueError(f"{where}: eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {weight_decay}")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit m and v (bitsandbytes' AdamW8bit state format).

    Args:
        params: parameters or parameter groups (fp32, fp16 or bf16; CPU or CUDA).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (weight decay
            default 1e-2). ``lr`` may be a CUDA scalar tensor, which keeps the
            step free of host values (CUDA-graph capturable).
        min_8bit_size: parameters with fewer elements keep float32 states.
    """

    _paged = False

    def __init__(
        self,
        params: Iterable,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = 4096,
    ):
        _check_hyper(type(self).__name__, lr, betas, eps, weight_decay)
        if min_8bit_size < 0:
            raise ValueError(f"{type(self).__name__}: min_8bit_size must be >= 0, got {min_8bit_size}")
        self.min_8bit_size = int(min_8bit_size)
        # Host copy of a float lr, refilled per group: the op reads it on the
        # host, so no device synchronization and no per-step allocation.
        self._lr_host = torch.zeros((), dtype=torch.float32)
        self._step_cache = {}
        self._state_version = 0  # bumped whenever states are created or replaced
        self._prefetch_pending = False
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        # Host-side bookkeeping that pickling or copying does not carry.
        self.__dict__.setdefault("_step_cache", {})
        self.__dict__.setdefault("_state_version", 0)
        self.__dict__.setdefault("_prefetch_pending", False)
        self.__dict__.setdefault("_lr_host", torch.zeros((), dtype=torch.float32))

    # ------------------------------------------------------------ groups

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        try:
            _check_hyper(f"{type(self).__name__} param group {gi}", group["lr"], group["betas"], group["eps"],
                         group["weight_decay"])
            for pi, p in enumerate(group["params"]):
                if p.is_complex():
                    raise TypeError(
                        f"{type(self).__name__}: parameter {pi} of group {gi} is complex ({p.dtype}); complex "
                        f"parameters are not supported (optimize torch.view_as_real(p) instead)")
                if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    raise TypeError(
                        f"{type(self).__name__}: parameter {pi} of group {gi} has dtype {p.dtype}; accepted are "
                        f"float32, float16 and bfloat16")
        except Exception:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------ state

    def _page(self, p: torch.Tensor) -> bool:
        return self._paged and p.device.type == "cuda" and p.numel() >= self.page_min_size

    def _new_state(self, p: torch.Tensor, dtype: torch.dtype, fill) -> torch.Tensor:
        self._state_version += 1
        if self._page(p):
            self._prefetch_pending = True
            nbytes = p.numel() * torch.empty((), dtype=dtype).element_size()
            t = ops.alloc_managed(nbytes, p.device).view(dtype).view(p.shape)
            return t.fill_(fill)
        return torch.full(p.shape, fill, dtype=dtype, device=p.device)

    def _init_state(self, p: torch.Tensor, state: dict):
        n = p.numel()
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if n >= self.min_8bit_size:
            nblocks = -(-n // BLOCKSIZE)
            state["state1"] = self._new_state(p, torch.uint8, _zero_code(True))
            state["state2"] = self._new_state(p, torch.uint8, _zero_code(False))
            state["absmax1"] = torch.zeros(nblocks, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(nblocks, dtype=torch.float32, device=p.device)
        else:
            state["state1"] = self._new_state(p, torch.float32, 0.0)
            state["state2"] = self._new_state(p, torch.float32, 0.0)
            state["absmax1"] = torch.zeros(0, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(0, dtype=torch.float32, device=p.device)

    # ------------------------------------------------------------ step

    def _lr_arg(self, lr, device: torch.device) -> torch.Tensor:
        if isinstance(lr, torch.Tensor):
            if lr.device == device or lr.device.type == "cpu":
                return lr if lr.dtype == torch.float32 else lr.float()
            return lr.to(device=device, dtype=torch.float32)
        return self._lr_host.fill_(lr)

    def _collect(self, gi: int, group: dict, name: str) -> dict:
        """The op's argument lists of one group, per device.

        The lists of parameters and states stay the same from step to step, so
        they are kept (with the states they point at) and only the gradients
        are gathered again; anything unusual (a parameter without a gradient,
        a DTensor, a state created or replaced since) takes the full path.
        Each device's lists come with "slices", the (start, end) of each op
        call (see _call_slices).
        """
        params = group["params"]
        grads = [p.grad for p in params]
        cache = self._step_cache.get(gi)
        if (cache is not None and cache["params"] is params and cache["n"] == len(params)
                and cache["version"] == self._state_version):
            for pi, g in enumerate(grads):
                if g is None:
                    break
                if g.is_sparse:
                    raise RuntimeError(f"{name}: parameter {pi} of group {gi} has a sparse gradient; "
                                       f"{name} supports dense gradients only")
            else:
                per_device = {}
                for device, lists in cache["per_device"].items():
                    lists = dict(lists)
                    lists["g"] = grads if lists["all"] else [grads[i] for i in lists["idx"]]
                    per_device[device] = lists
                return per_device
        per_device = defaultdict(lambda: {k: [] for k in ("p", "g", "s1", "s2", "a1", "a2", "step", "paged",
                                                           "idx")})
        cacheable = True
        for pi, p in enumerate(params):
            g = grads[pi]
            if g is None:
                cacheable = False
                continue
            if g.is_sparse:
                raise RuntimeError(f"{name}: parameter {pi} of group {gi} has a sparse gradient; "
                                   f"{name} supports dense gradients only")
            state = self.state[p]
            # FSDP2 (fully_shard) holds parameters and gradients as DTensor
            # shards, which the lowbit op does not take: step each rank's
            # shard in place (AdamW is elementwise; the states are shard-sized
            # and their 8-bit blocks are the shard's own).
            if _is_dtensor(p):
                cacheable = False
                p, g = p.to_local(), (g.to_local() if _is_dtensor(g) else g)
            if not state:
                self._init_state(p, state)
            lists = per_device[p.device]
            lists["idx"].append(pi)
            lists["p"].append(p)
            lists["g"].append(g)
            lists["s1"].append(state["state1"])
            lists["s2"].append(state["state2"])
            lists["a1"].append(state["absmax1"])
            lists["a2"].append(state["absmax2"])
            lists["step"].append(state["step"])
            if self._page(p):
                lists["paged"] += [state["state1"], state["state2"]]
        per_device = dict(per_device)
        for device, lists in per_device.items():
            lists["all"] = lists["idx"] == list(range(len(params)))  # one device, every parameter
            lists["slices"] = (_call_slices([p.numel() for p in lists["p"]]) if _split_calls(device)
                               else [(0, len(lists["p"]))])
            # Bytes of the paged states, summed once here (the cached lists keep it): the "auto"
            # prefetch check compares it with the card's free memory on every step.
            lists["paged_bytes"] = sum(t.numel() * t.element_size() for t in lists["paged"])
        if cacheable:
            kept = {d: {k: v for k, v in lists.items() if k != "g"} for d, lists in per_device.items()}
            self._step_cache[gi] = dict(params=params, n=len(params), version=self._state_version,
                                        per_device=kept)
        else:
            self._step_cache.pop(gi, None)
        return per_device

    def _prefetch(self, device: torch.device, paged: list, paged_bytes: int) -> None:
        """Paged states are prefetched to the GPU when they are new (created or
        loaded) and, with prefetch="auto", whenever the card has less free
        memory than they occupy (the driver may then have moved some of them
        to the host); prefetch="always" does it every step, "never" leaves all
        migration to the driver's page faults. Prefetching memory that is
        already on the card still costs the driver a walk over its pages
        (about 3.5 ms per GB on an H100), which is why it is not done blindly."""
        if not paged or self.prefetch == "never":
            return
        if self.prefetch == "always" or self._prefetch_pending:
            ops.prefetch_managed(paged)
            return
        free, _ = torch.cuda.mem_get_info(device)
        if free < paged_bytes:
            ops.prefetch_managed(paged)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        for gi, group in enumerate(self.param_groups):
            _check_hyper(f"{name} param group {gi}", group["lr"], group["betas"], group["eps"], group["weight_decay"])
            per_device = self._collect(gi, group, name)
            beta1, beta2 = float(group["betas"][0]), float(group["betas"][1])
            eps, wd = float(group["eps"]), float(group["weight_decay"])
            for device, lists in per_device.items():
                self._prefetch(device, lists["paged"], lists["paged_bytes"])
                lr = self._lr_arg(group["lr"], device)
                code1 = functional.get_dynamic_map(True, device)
                code2 = functional.get_dynamic_map(False, device)
                full = [lists[k] for k in ("p", "g", "s1", "s2", "a1", "a2", "step")]
                slices = lists["slices"]
                # The op counts the steps itself (increment_steps): no torch._foreach_add_ pass over the
                # lists before it. Each call checks all of its arguments before it writes anything, so
                # an error leaves every parameter either stepped or untouched.
                for a, b in slices:
                    args = full if len(slices) == 1 else [x[a:b] for x in full]
                    _adamw8bit_step(*args, lr, code1, code2, beta1, beta2, eps, wd, BLOCKSIZE, True, a)
        self._prefetch_pending = False
        return loss

    # ------------------------------------------------------------ save / load

    def load_state_dict(self, state_dict: dict):
        """Loads a state saved by AdamW8bit or PagedAdamW8bit, on any device.

        Unlike torch.optim.Optimizer's version, float32 absmax and states are
        never cast to the parameter's dtype, and the saved layout (number of
        groups, parameters per group, each parameter's size) must match.
        """
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups'")
        groups = self.param_groups
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(f"{name}.load_state_dict: the state_dict has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(groups)}: it was saved for a different param layout")
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"{name}.load_state_dict: parameter group {gi} of the state_dict has "
                                 f"{len(sg['params'])} parameters, this optimizer's has {len(g['params'])}: it was "
                                 f"saved for a different param layout")
        id_map = dict(zip(chain.from_iterable(sg["params"] for sg in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        new_state = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"{name}.load_state_dict: state for parameter index {key!r} matches no parameter "
                                 f"of the saved param groups")
            p = id_map[key]
            new_state[p] = self._load_param_state(p, value, key)
        new_groups = []
        for g, sg in zip(groups, saved_groups):
            ng = {k: v for k, v in sg.items() if k != "params"}
            ng["params"] = g["params"]
            if "param_names" in g:
                ng["param_names"] = g["param_names"]
            new_groups.append(ng)
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self._state_version += 1
        self._step_cache = {}

    def _load_param_state(self, p: torch.Tensor, saved: dict, key) -> dict:
        where = f"{type(self).__name__}.load_state_dict: state of parameter {key}"
        missing = [k for k in _STATE_KEYS if k not in saved]
        if missing:
            raise ValueError(f"{where} lacks {missing}; expected the keys {list(_STATE_KEYS)} of an AdamW8bit state")
        n = p.numel()
        s1, s2, a1, a2 = saved["state1"], saved["state2"], saved["absmax1"], saved["absmax2"]
        for k, t in (("state1", s1), ("state2", s2)):
            if t.numel() != n:
                raise ValueError(f"{where}: {k} has {t.numel()} elements but the parameter has {n} (shape "
                                 f"{tuple(p.shape)}): the state_dict was saved for a different param layout")
        if s1.dtype not in (torch.uint8, torch.float32) or s2.dtype != s1.dtype:
            raise ValueError(f"{where}: state1/state2 must both be uint8 or both float32, got {s1.dtype} and "
                             f"{s2.dtype}")
        want_blocks = -(-n // BLOCKSIZE) if s1.dtype == torch.uint8 else 0
        for k, t in (("absmax1", a1), ("absmax2", a2)):
            if t.numel() != want_blocks or t.dtype != torch.float32:
                raise ValueError(f"{where}: {k} must be float32 with {want_blocks} elements, got {t.dtype} with "
                                 f"{t.numel()}")
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: {k} holds NaN or Inf scales; the state is corrupt (every parameter "
                                 f"would become NaN after one step)")
        if s1.dtype == torch.float32 and not (bool(torch.isfinite(s1).all()) and bool(torch.isfinite(s2).all())):
            raise ValueError(f"{where}: state1/state2 hold NaN or Inf values; the state is corrupt")
        step = saved["step"]
        step = step.detach().to(torch.float32).reshape(()) if isinstance(step, torch.Tensor) else \
            torch.tensor(float(step), dtype=torch.float32)
        state = {"step": step.to(p.device, copy=True)}
        state["state1"] = self._new_state(p, s1.dtype, 0)
        state["state1"].copy_(s1.reshape(p.shape))
        state["state2"] = self._new_state(p, s2.dtype, 0)
        state["state2"].copy_(s2.reshape(p.shape))
        state["absmax1"] = a1.detach().to(p.device, copy=True).reshape(-1)
        state["absmax2"] = a2.detach().to(p.device, copy=True).reshape(-1)
        return state


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit whose 8-bit states of large parameters (>= page_min_size
    elements, on CUDA) live in CUDA managed memory: movable to host memory by
    the driver under memory pressure, prefetched to the GPU on the current
    stream before an update that may need it (``prefetch``: "auto", the
    default, when the states are new or the card has less free memory than
    they occupy; "always"; "never"), freed with the optimizer. Never
    allocates more managed memory than the card has free. Results equal
    AdamW8bit's bit for bit.
    """

    _paged = True

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, min_8bit_size: int = 4096, page_min_size: int = 100_000,
                 prefetch: str = "auto"):
        if page_min_size < 0:
            raise ValueError(f"PagedAdamW8bit: page_min_size must be >= 0, got {page_min_size}")
        if prefetch not in ("auto", "always", "never"):
            raise ValueError(f"PagedAdamW8bit: prefetch must be 'auto', 'always' or 'never', got {prefetch!r}")
        self.page_min_size = int(page_min_size)
        self.prefetch = prefetch
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size=min_8bit_size)


AdamW8bit.page_min_size = math.inf  # never paged
AdamW8bit.prefetch = "never"


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


__all__ = ["AdamW8bit", "PagedAdamW8bit", "state_bytes"]
