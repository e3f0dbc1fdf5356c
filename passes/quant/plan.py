"""The quantization plan (`--quant`, `--keep`): which format each role gets.

Roles: the body projections (qkv_proj, o_proj, gate_up_proj, down_proj), a
mixture of experts' stacked expert matrices (expert_gate_up, expert_down: every
expert of a layer in one [E, N, K] param, each row quantized alone; the router
stays float), the LM head and the embeddings. Default for 4-bit formats: LM head and embeddings
at q8 -- the head is the most sensitive matrix (llama.cpp keeps it at 6 bits
in its Q4_0 mix), and a tied head *is* the embedding table. `--keep ROLE=FMT`
overrides (FMT: a weight format, or `none` for the artifact's float dtype).

A group must divide K: where the requested group does not (SmolLM2's hidden
576 with g128), the format's group_for picks a smaller one and the manifest
records the group each param actually has. A matrix whose K has no group of
8 or more stays float, and the compiler says so (llama.cpp also falls back
per tensor).

`--quant gguf` keeps a GGUF file's own mix: every matrix in the kiln format that
holds its blocks (Q4_K -> q4k, Q4_0 / Q4_1 -> q4g32, Q8_0 / Q5_0 -> q8, float
stays float), q8 for block types no kiln format holds (Q6_K, Q5_K, ...), layer by
layer (llama.cpp's Q4_K_M gives half the layers' ffn_down Q6_K). The compiler
reads the block types (with_layers); the plan only holds the result.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ...errors import CompileError
from .registry import WEIGHT_FORMATS
from .weights import WeightFormat

SOURCE_MIX = "gguf"  # --quant gguf: the formats the file's own blocks call for, matrix by matrix
ROLES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "expert_gate_up", "expert_down", "lm_head", "embed")
BODY_ROLES = ROLES[:6]
# stacked expert params (frontends/models/moe.py Experts) -> their role
_EXPERT_ROLES = {".experts.gate_up": "expert_gate_up", ".experts.down": "expert_down"}
# multi-head latent attention's input projections (frontends/models/deepseek.py): the qkv_proj role
_MLA_INPUTS = (".q_proj.weight", ".q_a_proj.weight", ".q_b_proj.weight", ".kv_a_proj.weight")


@dataclass(frozen=True)
class QuantPlan:
    """Which format each role gets (None = the artifact's float dtype)."""

    weights: str
    roles: dict = field(default_factory=dict)  # role -> WeightFormat | None
    layers: dict = field(default_factory=dict)  # layer index -> {role: WeightFormat | None}, over `roles` (--quant gguf)
    keep: tuple = ()  # the --keep roles: they win over any layer's format

    @classmethod
    def parse(cls, quant: str | None, keep: list[str] | tuple[str, ...] = ()) -> QuantPlan | None:
        if quant in (None, "none"):
            if keep:
                raise CompileError("--keep needs --quant")
            return None
        if quant not in WEIGHT_FORMATS and quant != SOURCE_MIX:
            raise CompileError(f"--quant {quant!r} is not supported; supported: none, {', '.join(WEIGHT_FORMATS)}, {SOURCE_MIX}")
        body = WEIGHT_FORMATS["q8" if quant == SOURCE_MIX else quant]  # gguf: q8 until the file's block types are read
        head = WEIGHT_FORMATS["q8"] if body.bits < 8 else body
        roles = {r: body for r in BODY_ROLES} | {"lm_head": head, "embed": head}
        for item in keep:
            role, sep, fmt = str(item).partition("=")
            if not sep or role not in ROLES:
                raise CompileError(f"--keep {item!r}: expected ROLE=FORMAT with ROLE one of {', '.join(ROLES)}")
            if fmt != "none" and fmt not in WEIGHT_FORMATS:
                raise CompileError(f"--keep {item!r}: FORMAT must be none or one of {', '.join(WEIGHT_FORMATS)}")
            roles[role] = None if fmt == "none" else WEIGHT_FORMATS[fmt]
        return cls(quant, roles, keep=tuple(str(k).partition("=")[0] for k in keep))

    def with_sources(self, formats: dict[str, WeightFormat | None]) -> QuantPlan:
        """--quant gguf: the plan with each matrix's format from the file (param name -> the format
        its blocks call for, see the module docstring); layer params become per-layer roles, the
        LM head and embeddings global ones; --keep roles stay as given."""
        roles, layers = dict(self.roles), {}
        for name, fmt in formats.items():
            role = role_of(name)
            if role is None or role in self.keep:
                continue
            i = layer_of(name)
            table = roles if i is None else layers.setdefault(i, {})
            # several params of one role in a layer (MLA's q / kv_a inputs): the widest format among them
            table[role] = fmt if role not in table or i is None else _wider(table[role], fmt)
        for role in {r for t in layers.values() for r in t}:  # the global format: the one most layers have
            counts = Counter(t[role] for _, t in sorted(layers.items()) if role in t)
            roles[role] = counts.most_common(1)[0][0]
        return QuantPlan(self.weights, roles, layers, self.keep)

    def for_layer(self, i: int) -> QuantPlan:
        """The plan as decoder layer i sees it (its own formats over the global ones)."""
        if i not in self.layers:
            return self
        return QuantPlan(self.weights, self.roles | self.layers[i], {}, self.keep)

    def format_for(self, role: str, tied: bool = False) -> WeightFormat | None:
        # a tied LM head is the embedding table: one matrix, the head's format
        return self.roles["lm_head" if (tied and role == "embed") else role]

    def matrix_format(self, role: str, k: int, tied: bool = False) -> WeightFormat | None:
        """The format a matrix of this role with rows of k weights is stored in
        (None: float, by the plan or because its rows cannot be grouped)."""
        fmt = self.format_for(role, tied)
        return fmt if fmt is not None and fmt.fits(k) else None

    def describe(self) -> dict:
        out = {"weights": self.weights, "roles": {r: (f.name if f else "none") for r, f in self.roles.items()}}
        if self.layers:  # per layer, only where a layer differs from the global roles
            diff = {str(i): {r: (f.name if f else "none") for r, f in t.items() if self.roles.get(r) is not f} for i, t in sorted(self.layers.items())}
            out["layers"] = {i: t for i, t in diff.items() if t}
        return out


def layer_of(name: str) -> int | None:
    """The decoder layer index of a param name (`layers.7.mlp.down_proj.weight` -> 7), else None."""
    head, _, rest = name.partition(".")
    idx = rest.partition(".")[0]
    return int(idx) if head == "layers" and idx.isdigit() else None


def _wider(a: WeightFormat | None, b: WeightFormat | None) -> WeightFormat | None:
    """The format keeping more of the weights: float over any code, more bits over fewer."""
    if a is None or b is None:
        return None
    return a if (a.bits, -a.group) >= (b.bits, -b.group) else b


def role_of(name: str) -> str | None:
    """The plan role of a float param name, or None if it is never quantized."""
    if name == "embed_tokens":
        return "embed"
    if name == "lm_head.weight":
        return "lm_head"
    for r in BODY_ROLES:
        if name.endswith(f".{r}.weight"):
            return r
    if name.endswith(_MLA_INPUTS):
        return "qkv_proj"
    return next((r for sfx, r in _EXPERT_ROLES.items() if name.endswith(sfx)), None)


def expand_params(shapes: dict[str, tuple[int, ...]], plan: QuantPlan | None, tied: bool) -> dict[str, dict]:
    """Float param name -> {stored name: (shape, dtype)} plus its format.

    Stored names: `X.weight` -> `X.weight.q`, `X.weight.s` (, `X.weight.z`);
    `embed_tokens` -> `embed_tokens.q`, ...; a stack of expert matrices
    [E, N, K] keeps its leading axis in every part. Unquantized params map to themselves
    with dtype None (the graph decides: storage or fp32 norms); `kept_float`
    marks matrices the plan wanted quantized whose rows cannot be grouped."""
    out: dict[str, dict] = {}
    for name, shape in shapes.items():
        role = role_of(name)
        i = layer_of(name)
        plan_ = plan if plan is None or i is None else plan.for_layer(i)
        matrix = len(shape) == (3 if role in _EXPERT_ROLES.values() else 2)
        wanted = plan_ is not None and role is not None and matrix and plan_.format_for(role, tied) is not None
        fmt = plan_.matrix_format(role, shape[-1], tied) if wanted else None
        if fmt is None:
            out[name] = {"fmt": None, "kept_float": wanted, "parts": {name: (tuple(shape), None)}}
        else:
            out[name] = {"fmt": fmt, "group": fmt.group_for(shape[-1]),
                         "parts": {f"{name}.{sfx}": spec for sfx, spec in fmt.stacked_parts(tuple(shape)).items()}}
    return out
