"""Model slicing and hook points: a producer's slice computes exactly the full model's activations."""

import pytest
import torch

from saeforge.core.hooks import HookPoint, capture, layers_needed, replace
from saeforge.core.model import (
    BF16_MIN_SPEEDUP,
    ByteTokenizer,
    build_tiny_model,
    cpu_bf16_speedup,
    load_config,
    load_model,
    resolve_model,
    resolve_precision,
    run_slice,
    slice_dtype,
)
from saeforge.errors import UserError


def full_and_sliced(spec, hook, ids):
    full = load_model(spec)
    sliced = load_model(spec, n_layers=layers_needed([hook]))
    with torch.no_grad(), capture(full, [hook]) as want:
        full(input_ids=ids)
    with torch.no_grad(), capture(sliced, [hook]) as got:
        run_slice(sliced, ids)
    return full, sliced, want[hook.name], got[hook.name]


@pytest.mark.parametrize("kind", ["tiny", "tiny-gemma2"])
@pytest.mark.parametrize("site", ["resid_post", "attn_out", "mlp_out"])
def test_slice_equals_full_model_on_tiny_models(kind, site):
    spec = resolve_model(kind)
    hook = HookPoint(3, site)
    ids = torch.randint(3, ByteTokenizer.vocab_size, (2, 24))
    full, sliced, want, got = full_and_sliced(spec, hook, ids)
    assert len(sliced.model.layers) == 4 < len(full.model.layers)
    torch.testing.assert_close(got, want)


def test_local_model_folder_loads_only_needed_layers(tmp_path):
    build_tiny_model("tiny").save_pretrained(tmp_path / "m")
    spec = resolve_model(str(tmp_path / "m"))
    hook = HookPoint(2)
    ids = torch.randint(3, ByteTokenizer.vocab_size, (2, 16))
    _, sliced, want, got = full_and_sliced(spec, hook, ids)
    assert len(sliced.model.layers) == 3 and sliced.config.num_hidden_layers == 3
    torch.testing.assert_close(got, want)


def test_bad_model_path_and_layer_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read a model"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="has 8 layers"):
        HookPoint(8).check(load_config(resolve_model("tiny")).num_hidden_layers, "tiny")


def test_hook_parsing_and_names():
    assert HookPoint.parse("6") == HookPoint(6, "resid_post")
    assert HookPoint.parse("mlp_out:3") == HookPoint(3, "mlp_out")
    assert HookPoint.parse("blocks.6.hook_resid_post").name == "blocks.6.hook_resid_post"
    with pytest.raises(UserError, match="unknown hook site"):
        HookPoint.parse("nope:3")


def test_several_hooks_in_one_pass_and_replacement():
    model = build_tiny_model()
    hooks = [HookPoint(1), HookPoint(2, "mlp_out")]
    ids = torch.randint(3, ByteTokenizer.vocab_size, (1, 8))
    with torch.no_grad(), capture(model, hooks) as got:
        clean = model(input_ids=ids).logits
    assert set(got) == {h.name for h in hooks}
    with torch.no_grad(), replace(model, HookPoint(1), torch.zeros_like):
        ablated = model(input_ids=ids).logits
    assert not torch.allclose(clean, ablated)


def test_gguf_is_parsed_once_and_strings_decode_as_transformers_does(tmp_path):
    """The first preparation's speed-up (`_fast_gguf_reading`): transformers reads the GGUF three
    times (config, weights, tokenizer); within the context one parsed reader serves them all, and
    string values decode to what transformers' own parser gives."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from saeforge.core.model import _fast_gguf_reading

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    words = ["<bos>", "héllo", "▁world", ""]
    writer.add_token_list(words)
    writer.add_token_scores([0.0, -1.5, -2.5, 0.25])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def tokens(reader):
        field = reader.fields["tokenizer.ggml.tokens"]
        return [gguf_utils._gguf_parse_value(field.parts[i], field.types) for i in field.data]

    plain = tokens(gguf.GGUFReader(str(path)))
    with _fast_gguf_reading():
        first, second = gguf.GGUFReader(str(path)), gguf.GGUFReader(path)
        assert first is second
        assert tokens(first) == plain == words
    assert gguf.GGUFReader(str(path)) is not first  # restored afterwards


def test_precision_auto_is_bf16_on_a_gpu_and_measured_on_a_cpu():
    """--precision: an explicit value stands; auto is bf16 on a GPU, and on a CPU bf16 exactly
    when its bf16 matmuls measured at least BF16_MIN_SPEEDUP times faster than fp32 (the probe
    is cached: one measurement per process). A CPU keeps fp32 weights whatever it computes in."""
    assert resolve_precision("float32", "cuda") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    assert resolve_precision("auto", "cuda") == "bfloat16"
    speedup = cpu_bf16_speedup()
    assert speedup > 0 and cpu_bf16_speedup() == speedup
    assert resolve_precision("auto", "cpu") == ("bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32")
    assert slice_dtype("bfloat16", "cpu") == torch.float32
    assert slice_dtype("bfloat16", "cuda") == torch.bfloat16 and slice_dtype("float32", "cuda") == torch.float32
