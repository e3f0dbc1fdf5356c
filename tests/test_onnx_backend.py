"""ONNX's backend test suite (issue 18), a deterministic sample: one case per op
family that kiln passed in the full run (docs/ONNX_BACKEND.md,
benchmarks/results/onnx_backend_suite-2026-12-02.json) must still match, a sample of
the refused ones must still fail with a clean one-line KilnError (or match), and the
light model-zoo networks must match. Each case goes through kiln's real compile
(compile_onnx) and runtime (load(...).run), as benchmarks/onnx_backend_suite.py runs
them all."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.onnx_backend import collect, compare, restamp, run_case, skip_reason
from helpers.tiers import slow_except

pytest.importorskip("onnx")

# One case per op family that passed in the full run (its quickest, non-expanded if one passed), and a few
# model cases. A case here that stops matching fails the test.
PASS = """
node/test_abs node/test_acos_example node/test_acosh_example node/test_add_bcast node/test_and2d
node/test_argmax_no_keepdims_example node/test_argmin_default_axis_example node/test_asin_example
node/test_asinh_example node/test_atan_example node/test_atanh_example node/test_attention_3d_transpose_verification
node/test_averagepool_2d_ceil_last_window_starts_on_pad node/test_batchnorm_epsilon node/test_bitshift_right_uint32
node/test_bitwise_and_i32_2d node/test_bitwise_not_2d node/test_bitwise_or_i32_2d node/test_bitwise_xor_i32_2d
node/test_ceil node/test_clip_default_int8_inbounds node/test_concat_1d_axis_0 node/test_constant
node/test_basic_conv_without_padding node/test_convtranspose_1d node/test_cos_example node/test_cosh_example
node/test_depthtospace_example node/test_dequantizelinear_int16 node/test_div_example node/test_dropout_default
node/test_dynamicquantizelinear node/test_einsum_scalar node/test_elu_example node/test_equal_bcast node/test_erf
node/test_exp_example node/test_eyelike_without_dtype node/test_flatten_axis1 node/test_floor_example
node/test_gather_negative_indices node/test_gather_elements_0 node/test_gathernd_example_int32_batch_dim1
node/test_gelu_default_1 node/test_gemm_default_scalar_bias node/test_globalaveragepool_precomputed
node/test_globalmaxpool_precomputed node/test_greater_bcast node/test_greater_equal_bcast
node/test_gridsample_nearest_align_corners_1_additional_1 node/test_group_normalization_epsilon node/test_gru_reverse
node/test_hardmax_one_hot node/test_hardsigmoid_example node/test_hardswish node/test_identity node/test_if
node/test_instancenorm_example node/test_isinf node/test_isnan node/test_layer_normalization_2d_axis0
node/test_leakyrelu_example node/test_less_bcast node/test_less_equal_int8 node/test_log
node/test_logsoftmax_example_1 node/test_lppool_2d_dilations node/test_lrn node/test_lstm_reverse
node/test_matmul_1d_1d node/test_matmulinteger node/test_max_one_input
node/test_maxpool_2d_ceil_output_size_reduce_by_one node/test_maxunpool_export_without_output_shape
node/test_mean_one_input node/test_mvn node/test_min_one_input node/test_mish node/test_mod_uint16
node/test_mul_example node/test_neg_example node/test_nllloss_NC_expanded node/test_not_2d
node/test_optional_get_element_tensor node/test_optional_has_element_empty_no_input_name_optional_input node/test_or2d
node/test_pow_bcast_scalar node/test_prelu_broadcast node/test_quantizelinear_uint16 node/test_reciprocal_example
node/test_reduce_max_default_axes_keepdims_random node/test_reduce_min_default_axes_keepdims_example
node/test_reduce_prod_default_axes_keepdims_random node/test_relu node/test_rms_normalization_2d_axis1
node/test_simple_rnn_reverse node/test_roialign_aligned_false node/test_round node/test_scatter_with_axis
node/test_scatter_elements_with_negative_indices node/test_scatternd_max_with_element_indices node/test_selu_example
node/test_shape_end_negative_1 node/test_shrink_hard node/test_sigmoid_example node/test_sign node/test_sin_example
node/test_sinh_example node/test_size_example node/test_slice_start_out_of_bounds node/test_softmax_example
node/test_softplus_example node/test_softsign_example node/test_spacetodepth_example_expanded
node/test_split_equal_parts_2d node/test_sqrt_example node/test_sub_example node/test_sum_one_input
node/test_tan_example node/test_tanh_example node/test_thresholdedrelu_default node/test_tile_precomputed
node/test_transpose_all_permutations_0 node/test_tril node/test_where_example node/test_xor2d node/test_add
node/test_basic_conv_with_padding node/test_matmul_2d node/test_max_example node/test_attention_3d
simple/test_single_relu_model pytorch-converted/test_Conv2d_depthwise_strided pytorch-converted/test_LeakyReLU_with_negval
pytorch-operator/test_operator_maxpool simple/test_sequence_model3
""".split()

# Refused in the full run: each must fail with a clean one-line KilnError (a match is fine too).
REFUSED = """
node/test_convinteger_with_padding node/test_reduce_sum_keepdims_example node/test_resize_upsample_scales_nearest
node/test_batchnorm_epsilon_training_mode node/test_roialign_mode_max node/test_training_dropout
node/test_split_variable_parts_1d_opset18 node/test_cast_FLOAT_to_FLOAT8E4M3FN pytorch-converted/test_BatchNorm2d_eval
node/test_compress_0 node/test_nonmaxsuppression_single_box node/test_dequantizelinear_e4m3fn node/test_ai_onnx_ml_binarizer
""".split()

LIGHT = ["light/squeezenet", "light/resnet50", "light/zfnet512"]  # the smallest, the issue's, one more

FAST = {"node/test_add", "node/test_basic_conv_with_padding", "node/test_relu", "node/test_matmul_2d",
        "node/test_max_example", "node/test_dropout_default", "node/test_layer_normalization_2d_axis0",
        "node/test_attention_3d", "simple/test_single_relu_model", "node/test_convinteger_with_padding",
        "node/test_roialign_mode_max"}


@pytest.fixture(scope="module")
def cases():
    """{name: Case} for every case this file runs (the node cases are generated once: ~10 s)."""
    want = set(PASS) | set(REFUSED) | set(LIGHT)
    suites = sorted({n.split("/")[0] for n in want})
    found = {c.name: c for c in collect(suites, names=want)}
    missing = sorted(want - set(found))
    assert not missing, f"not in the installed onnx package's suite: {missing}"
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder for the artifacts (kiln's C kernels come from the kiln cache: compiler/cpu_codegen.py)."""
    return tmp_path_factory.mktemp("onnx_backend")


@pytest.mark.parametrize("name", slow_except(PASS, *FAST))
def test_case_matches(cases, workdir, name):
    r = run_case(cases[name], workdir)
    assert r.status == "pass", f"{name}: {r.status}: {r.detail}"


@pytest.mark.parametrize("name", slow_except(REFUSED, *FAST))
def test_refusal_is_clean(cases, workdir, name):
    r = run_case(cases[name], workdir)
    assert r.status in ("pass", "unsupported"), f"{name}: {r.status}: {r.detail}"
    if r.status == "unsupported":
        assert "\n" not in r.detail and "(multi-line message)" not in r.detail, r.detail


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT)
def test_light_network_matches(cases, workdir, name):
    r = run_case(cases[name], workdir)
    assert r.status == "pass", f"{name}: {r.status}: {r.detail}"


def test_compare_is_strict_on_shape_dtype_and_values():
    a = np.array([1.0, np.nan, 3.0], np.float32)
    assert compare([a], [a.copy()], 1e-3, 1e-5)[0] is None  # NaN equals NaN
    assert "dtype" in compare([a], [a.astype(np.float64)], 1e-3, 1e-5)[0]
    assert "shape" in compare([a[None]], [a], 1e-3, 1e-5)[0]
    assert "outside" in compare([a + 0.01], [a], 1e-3, 1e-5)[0]
    assert "differ" in compare([np.array([1, 2])], [np.array([1, 3])], 1e-3, 1e-5)[0]
    assert "outputs" in compare([a, a], [a], 1e-3, 1e-5)[0]


def test_out_of_scope_and_restamped_cases():
    from onnx import TensorProto, helper  # noqa: PLC0415

    def model(op, elem, opset, domain=""):
        node = helper.make_node(op, ["x"], ["y"], domain=domain)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", elem, [2])], [helper.make_tensor_value_info("y", elem, [2])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid(domain, opset)])

    assert skip_reason(model("Identity", TensorProto.STRING, 21)).startswith("string tensor")
    assert skip_reason(model("Gradient", TensorProto.FLOAT, 1, "ai.onnx.preview.training")).startswith("training")
    assert skip_reason(model("Relu", TensorProto.FLOAT, 14)) is None
    m = restamp(model("Relu", TensorProto.FLOAT, 25))  # Relu-14 is Relu-25 for float: re-stamped to 23
    assert m is not None and m.opset_import[0].version == 23
    assert restamp(model("Relu", TensorProto.FLOAT, 14)) is None  # in range: as it is
    assert restamp(model("Cast", TensorProto.FLOAT, 25)) is None  # Cast-25 has round_mode, Cast-23 has not: refused
