"""Reading a config.json strictly: every field is either mapped, known not to change the
math, or refused by name (an ignored field that changes the math would import a different
model without a word)."""

from lcjax.errors import ConvertError

# Fields of transformers' PretrainedConfig (and generation defaults) that do not change the
# forward pass.
NEUTRAL = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "use_cache", "initializer_range", "output_attentions", "output_hidden_states",
    "return_dict", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "tokenizer_class", "prefix", "task_specific_params", "_name_or_path", "chunk_size_feed_forward",
    "attention_dropout", "tf_legacy_loss", "use_bfloat16", "torchscript",
})


def check_fields(config: dict, known: set[str] | frozenset[str], hf_class: str) -> None:
  """ConvertError naming every field of `config` that is neither in `known` (the fields the
  architecture maps) nor NEUTRAL."""
  unknown = sorted(set(config) - set(known) - NEUTRAL)
  if unknown:
    raise ConvertError(
        f"{hf_class}: config.json field(s) {unknown} are not supported by lcjax's converter; "
        f"nothing was written. They may change the model's math, so they are not ignored: "
        f"remove them from config.json if they are at their no-op values, or open an issue.")


def require(config: dict, key: str, allowed, hf_class: str, default=None) -> None:
  """ConvertError unless config[key] (default when absent) is one of `allowed`."""
  value = config.get(key, default)
  if value not in allowed:
    raise ConvertError(f"{hf_class}: config.json {key}={value!r} is not supported (lcjax "
                       f"converts {key} in {list(allowed)}); nothing was written.")
