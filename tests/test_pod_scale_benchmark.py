"""The pod-scale benchmark: its byte counter against programs whose bytes are known,
and its quick mode end to end (subprocesses with 2 and 4 simulated devices)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from benchmarks import pod_scale
from benchmarks.hlo import collective_bytes, collectives, count_collectives
from tests import ROOT

# Hand-written: an async all-reduce in the entry, and a conditional whose branch calls
# (``calls=``) a computation holding an all-gather: that one runs only when taken.
_PROGRAM = """HloModule m

%gather (p: f32[2,8]) -> f32[8,8] {
  %p = f32[2,8]{1,0} parameter(0)
  ROOT %g = f32[8,8]{1,0} all-gather(%p), dimensions={0}
}

%rare (q: f32[2,8]) -> f32[8,8] {
  %q = f32[2,8]{1,0} parameter(0)
  ROOT %call = f32[8,8]{1,0} call(%q), to_apply=%gather
}

ENTRY %main (x: f32[2,8], k: s32[]) -> f32[8,8] {
  %x = f32[2,8]{1,0} parameter(0)
  %start = bf16[2,8]{1,0} all-reduce-start(%x), to_apply=%add
  %done = bf16[2,8]{1,0} all-reduce-done(%start)
  ROOT %c = f32[8,8]{1,0} conditional(%k, %x, %x), branch_computations={%rare, %other}
}
"""


def test_bytes_of_a_hand_written_program():
  # Operand bytes: the all-reduce's f32[2, 8] (its operand is %x, f32), the
  # all-gather's shard f32[2, 8] (not its gathered f32[8, 8]).
  assert count_collectives(_PROGRAM) == {"all-reduce": 1, "all-gather": 1}
  assert count_collectives(_PROGRAM, outside_branches=True) == {"all-reduce": 1}
  assert collective_bytes(_PROGRAM, outside_branches=True) == 2 * 8 * 4
  assert collective_bytes(_PROGRAM) == 2 * (2 * 8 * 4)


def _compiled_text(function, *args):
  return jax.jit(function).lower(*args).compile().as_text()


def test_bytes_of_compiled_collectives_whose_size_is_known():
  """A psum of f32[3, 1024] per device sends 12,288 bytes; an all-gather sends its
  shard; a psum inside a rarely taken ``lax.cond`` branch is not on every call."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("i",))
  shard = np.zeros((3, 1024), np.float32)
  x = jax.ShapeDtypeStruct((6, 1024), jnp.float32)

  def mapped(f, out_specs=None, check_vma=True):
    out_specs = P() if out_specs is None else out_specs
    return jax.shard_map(f, mesh=mesh, in_specs=P("i"), out_specs=out_specs, check_vma=check_vma)

  psum = _compiled_text(mapped(lambda a: jax.lax.psum(a, "i")), x)
  assert count_collectives(psum) == {"all-reduce": 1}
  assert collective_bytes(psum) == shard.nbytes == 12_288
  gathered = mapped(lambda a: jax.lax.all_gather(a, "i", tiled=True), check_vma=False)
  gather = _compiled_text(gathered, x)
  assert count_collectives(gather) == {"all-gather": 1}
  assert collective_bytes(gather) == shard.nbytes

  def rarely(a):
    taken = jnp.max(jnp.abs(a)) > 1e30
    return a + jax.lax.cond(taken, lambda b: jax.lax.psum(b, "i"), jnp.zeros_like, a[:1])

  # Unchecked: the branches' outputs differ in whether they vary across devices.
  text = _compiled_text(mapped(rarely, P("i"), check_vma=False), x)
  found = collectives(text)
  assert [(c.kind, c.bytes, c.every_call) for c in found] == [("all-reduce", 4096, False)]
  assert collective_bytes(text, outside_branches=True) == 0


def test_with_section_replaces_only_its_own_section():
  document = "# Benchmarks\n\n## cpu\n\ntable\n\n## Pod scale\n\nold\n"
  once = pod_scale.with_section(document, "## Pod scale\n\nnew\n")
  assert once == "# Benchmarks\n\n## cpu\n\ntable\n\n## Pod scale\n\nnew\n"
  assert pod_scale.with_section(once, "## Pod scale\n\nnew\n") == once
  appended = pod_scale.with_section("# Benchmarks\n\n## cpu\n\ntable\n", "## Pod scale\n\nx\n")
  assert appended == "# Benchmarks\n\n## cpu\n\ntable\n\n## Pod scale\n\nx\n"


def test_benchmarks_md_holds_the_committed_pod_scale_tables():
  """BENCHMARKS.md's section is the one the committed pod_scale.json gives, as both
  ``benchmarks.pod_scale`` and ``benchmarks.run`` write it."""
  document = (ROOT / "BENCHMARKS.md").read_text()
  section = pod_scale.committed_section()
  assert section.startswith(pod_scale.SECTION_TITLE)
  assert pod_scale.with_section(document, section) == document


def _check_layer_records(result: dict, settings: pod_scale.Settings) -> None:
  """One D's shard_map records: Flax fast's forward as Flax's code says, and every
  program's bytes in the whole program at least those on the common path."""
  assert "skipped" not in result and result["wall_s"] > 0
  for channels in settings.channels:
    records = result["shard_map"][str(channels)]
    # Flax's fast mode all-reduces mean and mean of squares, one f32[2, C] psum.
    assert records["flax_fast"]["forward"]["every_call"] == {
      "collectives": {"all-reduce": 1},
      "bytes": 2 * channels * 4,
    }
    for name in pod_scale.CANDIDATES:
      for program in pod_scale.PROGRAMS:
        record = records[name][program]
        assert record["all"]["bytes"] >= record["every_call"]["bytes"] > 0


@pytest.mark.slow
def test_quick_pod_scale_writes_every_section(tmp_path):
  results = pod_scale.main(["--quick", "--output-dir", str(tmp_path)])
  written = json.loads((tmp_path / "pod_scale.json").read_text())
  assert written == json.loads(json.dumps(results))
  settings = pod_scale.QUICK
  assert set(written["measured"]) == {str(d) for d in settings.devices}
  for devices in settings.devices:
    _check_layer_records(written["measured"][str(devices)], settings)
  pmap = written["measured"][str(settings.pmap_devices)]
  sizes = sorted(len(group) for group in pmap["pmap_groups"]["groups"])
  assert sizes[0] < sizes[-1] and sum(sizes) == settings.pmap_devices
  for scope in pod_scale.SCOPES:  # Flax sends the same f32[2, C] within any groups
    everyone, grouped = (
      pmap[key]["flax_fast"]["forward"][scope] for key in ("pmap", "pmap_groups")
    )
    assert everyone == grouped
  # Bytes are affine in C for every candidate, and Flax's do not grow with D.
  small, large = (written["fits"][str(d)] for d in settings.devices)
  for name in pod_scale.CANDIDATES:
    for program in pod_scale.PROGRAMS:
      assert all(small[name][program][s]["affine"] for s in pod_scale.SCOPES)
  for name in ("flax_fast", "flax_exact"):
    assert small[name] == large[name]
  # ResNet-50: the stem, three per bottleneck block (3 + 4 + 6 + 3 blocks), and one
  # per stage's projection shortcut.
  assert len(written["model_channels"]["ResNet-50"]) == 1 + 3 * (3 + 4 + 6 + 3) + 4
  for chip in pod_scale.CHIPS:
    assert set(written["modelled_time"][chip]) == {"ResNet-50", "BN-Inception"}
  markdown = (tmp_path / "pod_scale.md").read_text()
  for heading in (
    "One synchronized layer",
    "Bytes per channel",
    "Cross-check under pmap",
    "Per training",
  ):
    assert f"## {heading}" in markdown
  assert "MODELLED time" in markdown and written["command"] in markdown
  section = pod_scale.benchmarks_section(written)
  assert section.startswith(pod_scale.SECTION_TITLE) and "### Per training step" in section
