"""Reading a corpus's files into document texts (no tokenization): globs, bytes, UTF-8, plain
text split by a delimiter, JSONL with a text field and filters.

Every file goes through TensorFlow's file API (tf.io.gfile), so local paths and gs:// work
alike; a name ending in .gz is gunzipped. Bad input raises one DataError line naming the glob,
file, line or byte offset and the fix.
"""
import dataclasses
import gzip
import json
import operator
import re

import tensorflow as tf

from lcjax.errors import ConfigError, DataError

DECODE_ERRORS = ("raise", "skip")
_OPS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le,
        ">": operator.gt, "<": operator.lt}
_WILDCARD = re.compile(r"[*?\[]")
_FILTER = re.compile(r"^\s*([\w.\-]+)\s*(==|!=|>=|<=|>|<)\s*(.+?)\s*$")


@dataclasses.dataclass
class Skipped:
  """Documents skipped for undecodable bytes (on_decode_error="skip"), and the first place."""
  count: int = 0
  first: str = ""

  def add(self, where: str) -> None:
    self.count += 1
    self.first = self.first or where


def expand(globs: tuple[str, ...], what: str) -> list[str]:
  """Sorted, distinct files matched by `globs`; a directory named as such (not through a
  wildcard) stands for every file under it. Only such names are checked for being directories:
  on a bucket that check costs a request per path.

  what: the config field, for the error (e.g. "TextSource 'books'.files").
  """
  files = set()
  for pattern in globs:
    matches = tf.io.gfile.glob(pattern)
    if not matches:
      raise DataError(f"{what}: no file matches {pattern!r}. Fix the path or glob (local, or "
                      "gs://bucket/dir/*.txt).")
    for path in matches:
      if not _WILDCARD.search(pattern) and tf.io.gfile.isdir(path):
        files.update(f"{root}/{name}" for root, _, names in tf.io.gfile.walk(path)
                     for name in names)
      else:
        files.add(path)
  return sorted(files)


def read_bytes(path: str) -> bytes:
  """A file's bytes (gunzipped if it ends in .gz); DataError if there are none."""
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  if path.endswith(".gz"):
    data = gzip.decompress(data)
  if not data:
    raise DataError(f"{path} is empty. Fix: remove it or narrow the glob that matches it.")
  return data


def decode(data: bytes, path: str, offset: int, on_error: str, skipped: Skipped,
           line: int | None = None) -> str | None:
  """UTF-8 text of `data` (which starts at byte `offset` of the file), or None when it is
  undecodable and on_error is "skip" (counted in `skipped`)."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    where = f"{path}" + (f" line {line}" if line is not None else "") + \
        f" at byte offset {offset + e.start}"
    if on_error == "skip":
      skipped.add(where)
      return None
    raise DataError(f"{where}: bytes that are not UTF-8 ({e.reason}). Fix: re-encode the "
                    "file as UTF-8, or set on_decode_error = 'skip' on the source to skip "
                    "such documents.") from None


def text_documents(path: str, delimiter: str, on_error: str, skipped: Skipped):
  """Yields the documents of a plain text file: the whole file, or the pieces between
  `delimiter`s (empty pieces dropped, nothing else stripped)."""
  data = read_bytes(path)
  if not delimiter:
    pieces, sep = [data], b""
  else:
    sep = delimiter.encode("utf-8")
    pieces = data.split(sep)  # UTF-8 never matches a character's tail: splitting bytes is safe
  offset = 0
  for piece in pieces:
    if piece:
      text = decode(piece, path, offset, on_error, skipped)
      if text is not None:
        yield text
    offset += len(piece) + len(sep)


def parse_filter(expression: str, what: str):
  """"field op value" (op one of == != >= <= > <, value a JSON literal, field dotted for
  nested objects) -> (field path, op function, value); ConfigError if malformed."""
  match = _FILTER.match(expression)
  value = None
  if match:
    try:
      value = json.loads(match.group(3))
    except json.JSONDecodeError:
      match = None
  if not match:
    raise ConfigError(f"{what}: filter {expression!r} is not 'field op value' with op one of "
                      f"{list(_OPS)} and a JSON value (strings in double quotes), e.g. "
                      "'meta.source == \"arxiv\"' or 'length >= 65536'.")
  return tuple(match.group(1).split(".")), _OPS[match.group(2)], value


def _lookup(record, path):
  for key in path:
    if not isinstance(record, dict) or key not in record:
      return None, False
    record = record[key]
  return record, True


def jsonl_documents(path: str, text_field: str, filters: tuple[str, ...], on_error: str,
                    skipped: Skipped):
  """Yields record[text_field] of each JSONL line whose filters all hold (a record without a
  filter's field fails that filter); blank lines are ignored."""
  parsed = [(f, *parse_filter(f, path)) for f in filters]
  offset = 0
  for number, raw in enumerate(read_bytes(path).split(b"\n"), start=1):
    start, offset = offset, offset + len(raw) + 1
    if not raw.strip():
      continue
    line = decode(raw, path, start, on_error, skipped, line=number)
    if line is None:
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path} line {number}: not JSON ({e.msg}). Fix: one JSON object per "
                      "line.") from None
    text, found = _lookup(record, (text_field,))
    if not found or not isinstance(text, str):
      raise DataError(f"{path} line {number}: no string field {text_field!r} "
                      f"({'it is ' + type(text).__name__ if found else 'missing'}). Fix: set "
                      "the source's text_field to the field that holds the text.")
    keep = True
    for expression, field, op, value in parsed:
      got, present = _lookup(record, field)
      try:
        keep = keep and present and op(got, value)
      except TypeError:
        raise DataError(f"{path} line {number}: filter {expression!r} cannot compare "
                        f"{got!r} with {value!r}. Fix the filter's value type.") from None
    if keep:
      yield text
