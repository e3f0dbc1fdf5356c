"""Converters for arithmetic on symbolic dimensions, tried before TVM's (a converter
returning None leaves the node to TVM's). Both met in ViT's dynamic-size export.

Div of dimensions: TVM 0.27 divides integer PrimExprs with `truncdiv` (ONNX's
rounding toward zero), while the shapes TVM derives itself (Conv's output
`h // 8`) use `floordiv`. The analyzer cannot prove `truncdiv(h, 8) == h // 8`
without knowing h >= 0, so an Add of the two has an unknown shape and a later
Shape fails ("shape_of expects a tensor input"). Dimensions are never
negative: when the numerator is provably >= 0 with every dimension variable
>= 0 and the divisor a positive constant, the two roundings agree, and kiln
emits `floordiv`.

Resize: ViT's `interpolate_pos_encoding` resizes its position table to the image's patch grid:
`Resize(pos [1, C, g, g], sizes=Concat([1, C], Shape(image)[2:] // patch))`. The importer
turns such `sizes` into a ShapeExpr of PrimExprs (`h // 8`), and TVM 0.27's converter
reads every entry with `int(v.value)` ("'Div' object has no attribute 'value'"). Relax's
resize2d takes symbolic sizes as they are; kiln emits it with the same attribute mapping
as TVM's converter, for the one case TVM's refuses (4-D, sizes given, not all constant,
no ROI, no opset-18 axes / aspect policy / antialias). Everything else goes to TVM's.
"""

from __future__ import annotations

from collections.abc import Callable


def convert_resize(t, bb, inputs, attrs):
    if len(inputs) < 4 or not isinstance(inputs[3], t.relax.ShapeExpr):
        return None
    sizes = list(inputs[3].values)
    x = inputs[0]
    shape = getattr(x.ty, "shape", None)
    if len(sizes) != 4 or shape is None or len(shape) != 4 or all(isinstance(v, t.tvm.tirx.IntImm) for v in sizes):
        return None
    if inputs[1] is not None and not _empty(t, inputs[1]) or inputs[2] is not None and not _empty(t, inputs[2]):
        return None  # an ROI (tf_crop_and_resize) or scales beside sizes: TVM's converter decides
    if attrs.get("axes") or attrs.get("antialias", 0) or attrs.get("keep_aspect_ratio_policy", b"stretch") != b"stretch":
        return None
    mode = attrs.get("mode", b"nearest").decode("ascii")
    return t.relax.op.image.resize2d(
        x, size=t.relax.ShapeExpr(sizes[2:]), roi=[0.0] * 4, layout="NCHW",
        method="nearest_neighbor" if mode == "nearest" else mode,
        coordinate_transformation_mode=attrs.get("coordinate_transformation_mode", b"half_pixel").decode("ascii"),
        rounding_method=attrs.get("nearest_mode", b"round_prefer_floor").decode("ascii"),
        cubic_alpha=attrs.get("cubic_coeff_a", -0.75), cubic_exclude=attrs.get("exclude_outside", 0),
        extrapolation_value=attrs.get("extrapolation_value", 0.0))


def _empty(t, x) -> bool:
    """An empty constant (exporters pass `roi` / `scales` as [] to skip them)."""
    return isinstance(x, t.tvm.ir.GenericConst) and x.value.numpy().size == 0


def convert_div(t, bb, inputs, attrs):
    tir = t.tvm.tirx
    num, den = inputs[0], inputs[1]
    if not t.tvm.ir.is_prim_expr(num) or not isinstance(den, t.tvm.ir.GenericConst):
        return None
    d = den.value.numpy()
    dtype = _dtype(num)
    if d.size != 1 or d.dtype.kind not in "iu" or dtype not in ("int64", "int32") or int(d.reshape(-1)[0]) <= 0:
        return None
    analyzer = t.tvm.sym.Analyzer()
    for v in tir.analysis.undefined_vars(num):  # every variable in the importer's integer PrimExprs is a dimension
        analyzer.update(v, t.tvm.sym.ConstIntBound(0, t.tvm.sym.ConstIntBound.POS_INF))
    if not analyzer.can_prove(num >= tir.IntImm(dtype, 0)):
        return None
    return t.relax.prim_value(tir.floordiv(num, tir.IntImm(dtype, int(d.reshape(-1)[0]))))


def _dtype(v) -> str:
    return str(getattr(v, "dtype", None) or v.ty)  # TVM 0.27 PrimExprs carry their dtype as `ty`


SYMBOLIC_CONVERTERS: dict[str, Callable] = {"Div": convert_div, "Resize": convert_resize}
