"""The gated vLLM LoRA layers on CPU, in the style of vLLM's tests/lora/test_layers.py.

Real vLLM base layers (column, merged column, merged QKV, row, replicated) wrapped by the plugin's
gated classes, a real CPU punica wrapper and token mapping; the reference is base + per-token gated
delta from `tspeft_rt.gate` computed directly (B A x, not the Gram matrix the layers use).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.config.lora import LoRAConfig  # noqa: E402
from vllm.lora.layers import (  # noqa: E402
    ColumnParallelLinearWithLoRA,
    LoRAMapping,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
from vllm.model_executor.layers.linear import (  # noqa: E402
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

from tspeft_rt.gate import gate_keep, row_sq_norm  # noqa: E402
from tspeft_rt.kernels.gated_lora import UNCOVERED  # noqa: E402
from tspeft_rt.serve.layers import GATED_CLASSES, GatedLoRALayer  # noqa: E402
from tspeft_rt.serve.punica import get_gated_punica_wrapper  # noqa: E402
from tspeft_rt.serve.state import GatedSlots  # noqa: E402
from tspeft_rt.serve.telemetry import TELEMETRY  # noqa: E402

MAX_LORAS, MAX_RANK, IN = 3, 8, 64
RANKS = {1: 8, 2: 4}  # adapter id -> rank (4 is zero-padded to the max rank in the slot buffers)
LORA_INDEX_TO_ID = [1, None, 2]  # slot -> adapter id; the last slot is filled, so a token wrongly
# sent to slot -1 (= the last slot, in Python indexing) shows


@pytest.fixture(scope="module", autouse=True)
def vllm_single_process(tmp_path_factory):
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )

    with set_current_vllm_config(VllmConfig()):
        init_method = f"file://{tmp_path_factory.mktemp('dist') / 'init'}"
        init_distributed_environment(1, 0, init_method, 0, backend="gloo")
        initialize_model_parallel(1, 1)
        yield
        destroy_model_parallel()
        destroy_distributed_environment()


LAYERS = {
    "column": (lambda: ColumnParallelLinear(IN, 48, bias=True, params_dtype=torch.float32),
               ColumnParallelLinearWithLoRA),
    "merged_column": (lambda: MergedColumnParallelLinear(IN, [40, 40], bias=False, params_dtype=torch.float32),
                      MergedColumnParallelLinearWithLoRA),
    "merged_qkv": (lambda: QKVParallelLinear(IN, 16, 4, 2, bias=True, params_dtype=torch.float32),
                   MergedQKVParallelLinearWithLoRA),
    "row": (lambda: RowParallelLinear(48, IN, bias=True, params_dtype=torch.float32), RowParallelLinearWithLoRA),
    "replicated": (lambda: ReplicatedLinear(IN, 32, bias=False, params_dtype=torch.float32),
                   ReplicatedLinearWithLoRA),
}


class Case:
    """One wrapped layer with adapters in slots 0 and 2, and its per-token reference."""

    def __init__(self, kind: str, seed: int, gated: bool = True, path: str = "cpu-op") -> None:
        torch.manual_seed(seed)
        make_base, stock_cls = LAYERS[kind]
        self.base = make_base()
        for p in self.base.parameters():
            p.data.normal_(0, 0.5)
        self.w0 = self.base.weight.detach().clone()  # vLLM on CPU keeps the weight only packed, after this:
        self.base.quant_method.process_weights_after_loading(self.base)
        cls = GATED_CLASSES[stock_cls] if gated else stock_cls
        self.config = LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=MAX_RANK, lora_dtype=torch.float32)
        self.layer = cls(self.base)
        self.layer.create_lora_weights(MAX_LORAS, self.config)
        if path != "cpu-op":  # the CUDA path on CPU tensors under Triton's interpreter, or the PyTorch path
            self.layer.gated = GatedSlots(self.layer.lora_a_stacked, self.layer.lora_b_stacked,
                                          self.layer.output_slices, use_triton=path == "triton",
                                          use_cpu_op=False)
        self.punica = get_gated_punica_wrapper(256, max_batches=256, device="cpu", lora_config=self.config)
        self.layer.set_mapping(self.punica)
        self.in_features = self.base.input_size
        slices = self.layer.output_slices
        self.weights = {}  # adapter id -> per slice (A [r, in], B [n, r])
        for slot, adapter_id in enumerate(LORA_INDEX_TO_ID):
            if adapter_id is None:
                self.layer.reset_lora(slot)
                continue
            r = RANKS[adapter_id]
            pairs = [(torch.randn(r, self.in_features) * 0.3, torch.randn(n, r) * 0.3) for n in slices]
            self.weights[adapter_id] = pairs
            a, b = [p[0] for p in pairs], [p[1] for p in pairs]
            self.layer.set_lora(slot, a if len(slices) > 1 else a[0], b if len(slices) > 1 else b[0])

    def run(self, adapter_ids: list[int], x: torch.Tensor) -> torch.Tensor:
        """vLLM's metadata update for the mapping, then the layer's forward on x (rows of x past the
        mapping: CUDA-graph padding)."""
        mapping = LoRAMapping(tuple(adapter_ids), tuple(adapter_ids), is_prefill=True)
        self.punica.update_metadata(mapping, LORA_INDEX_TO_ID, MAX_LORAS, 1000)
        out = self.layer(x)
        return out[0] if isinstance(out, tuple) else out

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # W0 x + b (vLLM's linear layers return (output, bias or None))
        return out[0] if isinstance(out, tuple) else out

    def deltas(self, adapter_id: int, x: torch.Tensor) -> list[torch.Tensor]:
        return [x @ a.T @ b.T for a, b in self.weights[adapter_id]]

    def reference(self, adapter_ids: list[int], x: torch.Tensor, taus: dict[int, list]) -> torch.Tensor:
        """base + per token and slice: the delta where gate_keep says so (tau None: always)."""
        base = self.base_output(x)
        out = base.clone()
        offsets = [0]
        for n in self.layer.output_slices:
            offsets.append(offsets[-1] + n)
        for t, adapter_id in enumerate(adapter_ids):
            if adapter_id <= 0:
                continue
            for s, delta in enumerate(self.deltas(adapter_id, x[t:t + 1])):
                lo, hi = offsets[s], offsets[s + 1]
                tau = taus.get(adapter_id, [None] * len(offsets))[s]
                if tau is None or gate_keep(row_sq_norm(delta), row_sq_norm(base[t:t + 1, lo:hi]), tau).item():
                    out[t, lo:hi] += delta[0]
        return out

    def ratios(self, adapter_ids: list[int], x: torch.Tensor, adapter_id: int, s: int) -> torch.Tensor:
        rows = [t for t, a in enumerate(adapter_ids) if a == adapter_id]
        base = self.base_output(x[rows])
        lo = sum(self.layer.output_slices[:s])
        hi = lo + self.layer.output_slices[s]
        delta = self.deltas(adapter_id, x[rows])[s]
        return (row_sq_norm(delta) / row_sq_norm(base[:, lo:hi])).sqrt()


def split_tau(ratios: torch.Tensor, q: float) -> float:
    """A threshold between two neighbouring ratios, so no token sits on the boundary."""
    r = ratios.sort().values
    i = min(max(int(q * len(r)), 1), len(r) - 1)
    return float((r[i - 1] + r[i]) / 2)


PATHS = ["cpu-op", "pytorch", "triton"]  # the layer's serving paths: CPU default, its fallback, CUDA's kernels
MIXED = [1, 1, 2, 0, 2, 1, 0, 1, 2, 2, 1, 0, 1, 2, 1, 1, 2, 0, 1, 2, 2, 1, 1, 2]  # 0 = no adapter


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gated_classes_subclass_vllm(kind):
    stock = LAYERS[kind][1]
    assert issubclass(GATED_CLASSES[stock], stock)


BATCHES = {"small": [1, 2, 2, 1, 1, 2, 1, 2], "large": [1, 2, 2, 1, 1, 2, 1, 2] * 20, "one-slot": [2] * 96}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("batch", list(BATCHES))
def test_tau_zero_equals_stock_lora(kind, batch):
    """Without gates the gated layer is vLLM's LoRA layer (tokens all mapped: vLLM 0.32's CPU ops are
    wrong for unmapped tokens, see test_serve_plugin). Small groups take the masked path, large ones
    the slice-by-slice one, a whole batch of one slot the in-place one."""
    ids = BATCHES[batch]
    x = torch.randn(len(ids), LAYERS[kind][0]().input_size, generator=torch.Generator().manual_seed(5))
    gated, stock = Case(kind, seed=1), Case(kind, seed=1, gated=False)
    gated.layer.set_gate(0, [0.0] * gated.layer.n_slices)  # tau 0 keeps every token
    torch.testing.assert_close(gated.run(ids, x), stock.run(ids, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_tau_above_every_ratio_equals_base(kind):
    case = Case(kind, seed=2)
    x = torch.randn(len(MIXED), case.in_features)
    for slot in (0, 2):
        case.layer.set_gate(slot, [1e6] * case.layer.n_slices)
    torch.testing.assert_close(case.run(MIXED, x), case.base_output(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("seed,repeat", [(3, 1), (4, 8)])
@pytest.mark.parametrize("path", PATHS[:2])
def test_intermediate_tau_matches_reference_per_token(kind, seed, repeat, path):
    """Mixed slots (and tokens with no adapter), each slice of each slot with its own tau; a decode-sized
    batch (the CPU op's per-token loops) and a prefill-sized one (its matmuls) whose first slice keeps
    8 % of its rows."""
    case = Case(kind, seed=seed, path=path)
    ids = MIXED * repeat
    x = torch.randn(len(ids), case.in_features)
    taus = {}
    for slot, adapter_id in enumerate(LORA_INDEX_TO_ID):
        if adapter_id is None:
            continue
        qs = ([0.3, 0.5, 0.7] if repeat == 1 else [0.92, 0.5, 0.3])[: case.layer.n_slices]
        taus[adapter_id] = [split_tau(case.ratios(ids, x, adapter_id, s), q) for s, q in enumerate(qs)]
        case.layer.set_gate(slot, taus[adapter_id])
    expected = case.reference(ids, x, taus)
    got = case.run(ids, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    base = case.base_output(x)
    changed = (got - base).abs().amax(-1) > 0
    assert not changed[[t for t, a in enumerate(ids) if a == 0]].any(), "a token without adapter got a delta"
    assert 0 < changed.sum() < sum(a > 0 for a in ids), "the gate kept all or none: the case tests nothing"


def test_packed_slices_gate_independently():
    """q on, k off, v gated: each slice of the fused qkv layer follows its own tau."""
    case = Case("merged_qkv", seed=6)
    ids = [1] * 10
    x = torch.randn(len(ids), case.in_features)
    v_tau = split_tau(case.ratios(ids, x, 1, 2), 0.5)
    case.layer.set_gate(0, [0.0, 1e6, v_tau])
    out, base = case.run(ids, x), case.base_output(x)
    q, k, _ = case.layer.output_slices
    assert ((out[:, :q] - base[:, :q]).abs().amax(-1) > 0).all()
    torch.testing.assert_close(out[:, q:q + k], base[:, q:q + k], rtol=0, atol=0)
    v_changed = (out[:, q + k:] - base[:, q + k:]).abs().amax(-1) > 0
    assert 0 < v_changed.sum() < len(ids)
    torch.testing.assert_close(out, case.reference(ids, x, {1: [0.0, 1e6, v_tau]}), rtol=1e-5, atol=1e-5)


def test_reset_lora_restores_base_and_clears_gate():
    case = Case("merged_column", seed=7)
    x = torch.randn(len(MIXED), case.in_features)
    case.layer.set_gate(0, [0.1, 0.2])
    for slot in range(MAX_LORAS):
        case.layer.reset_lora(slot)
    assert (case.layer.gated.packed.tau == UNCOVERED).all()
    torch.testing.assert_close(case.run(MIXED, x), case.base_output(x), rtol=0, atol=0)


def test_batch_without_adapters_is_base():
    case = Case("merged_qkv", seed=8)
    x = torch.randn(6, case.in_features)
    torch.testing.assert_close(case.run([0] * 6, x), case.base_output(x), rtol=0, atol=0)


def test_set_gate_checks_slice_count():
    case = Case("merged_qkv", seed=9)
    with pytest.raises(ValueError, match="3 slices"):
        case.layer.set_gate(0, [0.1, 0.2])


@pytest.mark.parametrize("path", PATHS)
def test_metadata_sequence_adapter_base_only_padded(path):
    """vLLM's own metadata code through an adapter batch, a base-only batch and a padded batch (more
    rows than mapped tokens, as CUDA graphs run): base-only and padding rows keep the base bit for bit.
    The Triton path once read vLLM's CUDA kernel metadata, which a base-only batch leaves stale."""
    case = Case("merged_qkv", seed=10, path=path)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(len(MIXED), case.in_features, generator=gen)
    all_adapter = [a or 1 for a in MIXED]
    torch.testing.assert_close(case.run(all_adapter, x), case.reference(all_adapter, x, {}), rtol=1e-5, atol=1e-5)
    base_only = [0] * len(MIXED)
    assert torch.equal(case.run(base_only, x), case.base_output(x)), "a base-only batch got a delta"
    mapped = MIXED[:9]
    out, base = case.run(mapped, x), case.base_output(x)
    torch.testing.assert_close(out[:9], case.reference(mapped, x[:9], {}), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[9:], base[9:]), "a padding row got a delta"
    assert torch.equal(case.run(base_only[:3], x), base), "a padded base-only batch got a delta"


@pytest.mark.parametrize("path", PATHS)
def test_slices_an_adapter_lacks_are_neither_applied_nor_counted(path):
    """A q,v adapter in the packed qkv layer (vLLM passes None for the missing k) and an adapter with no
    weights in the layer (pruned: vLLM resets its slot): those rows keep the base, and the telemetry
    counts only the (token, slice) updates the adapters cover."""
    case = Case("merged_qkv", seed=14, path=path)
    (qa, qb), _, (va, vb) = case.weights[1]
    case.layer.set_lora(0, [qa, None, va], [qb, None, vb])
    case.layer.reset_lora(2)
    x = torch.randn(len(MIXED), case.in_features, generator=torch.Generator().manual_seed(15))

    def counts(slot: int) -> tuple[int, int]:
        return tuple(TELEMETRY.counters[:, slot].tolist())

    before = [counts(0), counts(2)]
    out, base = case.run(MIXED, x), case.base_output(x)
    q, k, _ = case.layer.output_slices
    rows1, rows2 = [[t for t, a in enumerate(MIXED) if a == i] for i in (1, 2)]
    assert torch.equal(out[rows1, q:q + k], base[rows1, q:q + k]) and torch.equal(out[rows2], base[rows2])
    assert ((out[rows1, :q] - base[rows1, :q]).abs().amax(-1) > 0).all()
    routed0, kept0 = (a - b for a, b in zip(counts(0), before[0]))
    assert routed0 == kept0 == 2 * len(rows1)  # q and v, no gate
    assert counts(2) == before[1]


@pytest.mark.parametrize("path", PATHS)
def test_layer_traces_whole_with_torch_compile(path):
    """The layer's path under torch.compile(fullgraph=True, dynamic=True) (aot_eager here; the e2e
    server runs the CPU path under vLLM's Inductor compilation): no graph break, the gate decisions and
    counters of eager, and later batches' slots, batch sizes, adapters and thresholds reach the
    compiled code (it reads the layer's and the batch's buffers, not values frozen at trace time)."""
    backend = "aot_eager"
    case = Case("merged_qkv", seed=12, path=path)
    x = torch.randn(len(MIXED), case.in_features, generator=torch.Generator().manual_seed(13))
    case.layer.set_gate(0, [0.0, 1e6, split_tau(case.ratios(MIXED, x, 1, 2), 0.5)])
    compiled = torch.compile(lambda x, out: case.layer._apply_lora_to_output(x, out), backend=backend,
                             fullgraph=True, dynamic=True)
    v_tau = split_tau(case.ratios(MIXED, x, 2, 2), 0.3)
    batches = [(MIXED, None), ([0] * 7, None), ([2] * len(MIXED), None), (MIXED[:5], None), (MIXED, v_tau)]
    for ids, tau in batches:
        if tau is not None:  # a new threshold set between batches, as when an adapter takes a slot
            case.layer.set_gate(2, [0.0, 0.0, tau])
        eager = case.run(ids, x[:len(ids)])
        before = TELEMETRY.counters.clone()
        got = compiled(x[:len(ids)], case.base_output(x[:len(ids)]))
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        base = case.base_output(x[:len(ids)])
        assert torch.equal((got != base).any(-1), (eager != base).any(-1)), f"a gate decision differs on {ids}"
        after_compiled = TELEMETRY.counters.clone()
        case.run(ids, x[:len(ids)])
        assert torch.equal(after_compiled - before, TELEMETRY.counters - after_compiled), f"counters differ on {ids}"


def test_fully_sharded_loras_serve_gated_adapters_never_densely():
    """With --fully-sharded-loras vLLM picks its sharded LoRA classes (not gated) for qkv: a gated or
    DoRA adapter is refused at load, naming the module and class; plain LoRA is served as vLLM would. A
    gated layer built without DoRA state refuses a DoRA adapter too, saying so."""
    from types import SimpleNamespace

    from vllm.lora.utils import from_layer

    from tspeft_rt.serve import plugin
    from tspeft_rt.serve.adapters import GatedWorkerLoRAManager

    plugin.register()
    qkv = "model.layers.0.self_attn.qkv_proj"
    children = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    adapter = SimpleNamespace(loras=dict.fromkeys(children[::2]))  # q and v
    request = SimpleNamespace(lora_name="gated")
    for sharded in (False, True):
        config = LoRAConfig(max_loras=2, max_lora_rank=8, lora_dtype=torch.float32, fully_sharded_loras=sharded)
        layer = from_layer(QKVParallelLinear(IN, 16, 4, 2, bias=False, params_dtype=torch.float32), 2, config,
                           ["q_proj", "k_proj", "v_proj"])
        worker = SimpleNamespace(_adapter_manager=SimpleNamespace(modules={qkv: layer}, packed_modules={qkv: children}))
        GatedWorkerLoRAManager._check_modules_served(worker, request, adapter, gated=False, dora=False)
        reason = "the server was started without DoRA support" if not sharded else \
            f"{type(layer).__name__} has no DoRA path"
        with pytest.raises(ValueError, match=rf"DoRA adapter, but .*q_proj \({reason}\)"):
            GatedWorkerLoRAManager._check_modules_served(worker, request, adapter, gated=False, dora=True)
        if not sharded:
            GatedWorkerLoRAManager._check_modules_served(worker, request, adapter, gated=True, dora=False)
            continue
        with pytest.raises(ValueError, match=rf"q_proj \({type(layer).__name__}\).*fully-sharded"):
            GatedWorkerLoRAManager._check_modules_served(worker, request, adapter, gated=True, dora=False)


@pytest.mark.parametrize("kind", ["merged_qkv", "row"])
def test_dora_slot_beside_lora_slot_matches_dora_math(kind, monkeypatch):
    """A DoRA adapter in slot 0 (per slice c = mag / ||W0_s + B_s A_s||_row from the layer's own base
    weight, delta = (c - 1) W0 x + c B A x, W0 x being the output minus the bias) beside a LoRA adapter in
    slot 2 and tokens without adapter; every slice gated on the norm of its delta."""
    monkeypatch.setattr(GatedLoRALayer, "serves_dora", True)
    case = Case(kind, seed=16)
    offsets = [0]
    for n in case.layer.output_slices:
        offsets.append(offsets[-1] + n)
    weight = case.w0
    gen = torch.Generator().manual_seed(17)
    merged = [weight[lo:hi] + b @ a for (a, b), lo, hi in zip(case.weights[1], offsets, offsets[1:])]
    mags = [torch.linalg.norm(w, dim=1) * (1 + 0.3 * torch.randn(w.shape[0], generator=gen)) for w in merged]
    case.layer.set_dora(0, mags)
    scale = torch.cat([m / torch.linalg.norm(w, dim=1) for m, w in zip(mags, merged)])
    x = torch.randn(len(MIXED), case.in_features, generator=gen)
    base = case.base_output(x)
    w0x = base - (case.base.bias if case.base.bias is not None else 0)

    def delta(adapter_id: int, t: int) -> torch.Tensor:
        lora = torch.cat(case.deltas(adapter_id, x[t:t + 1]), dim=1)[0]
        return (scale - 1) * w0x[t] + scale * lora if adapter_id == 1 else lora

    ratios = {i: [torch.stack([(row_sq_norm(delta(i, t)[lo:hi]) / row_sq_norm(base[t, lo:hi])).sqrt()[0]
                               for t, a in enumerate(MIXED) if a == i]) for lo, hi in zip(offsets, offsets[1:])]
              for i in (1, 2)}
    taus = {i: [split_tau(r, 0.5) for r in ratios[i]] for i in (1, 2)}
    for slot, i in ((0, 1), (2, 2)):
        case.layer.set_gate(slot, taus[i])
    expected = base.clone()
    for t, i in enumerate(MIXED):
        if i:
            d = delta(i, t)
            for s, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
                if gate_keep(row_sq_norm(d[lo:hi]), row_sq_norm(base[t, lo:hi]), taus[i][s]).item():
                    expected[t, lo:hi] += d[lo:hi]
    torch.testing.assert_close(case.run(MIXED, x), expected, rtol=1e-5, atol=1e-5)
    assert case.layer.dora_unsupported() is None


def test_layer_without_dora_state_says_so():
    case = Case("merged_qkv", seed=18)
    assert case.layer.dora_unsupported() == "the server was started without DoRA support"
    with pytest.raises(ValueError, match="cannot serve DoRA: the server was started without DoRA support"):
        case.layer.set_dora(0, [torch.ones(n) for n in case.layer.output_slices])
