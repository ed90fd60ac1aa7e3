"""The persistent compilation cache setting: where it points, and off."""

import os

import jax

from linfjax.runs import compile_cache


def test_setting_beats_environment_beats_default(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
  default = compile_cache.resolve()
  assert default.startswith(str(tmp_path / "xdg" / "linfjax" / "jax") + os.sep)
  assert default == compile_cache.default_dir()  # The same CPU, the same subdirectory.
  monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "from_env"))
  assert compile_cache.resolve() == str(tmp_path / "from_env")
  assert compile_cache.resolve(str(tmp_path / "given")) == str(tmp_path / "given")
  assert compile_cache.resolve("OFF") is None
  monkeypatch.setenv(compile_cache.ENV_VAR, "off")
  assert compile_cache.resolve() is None


def test_enable_points_jax_at_the_directory_and_off_turns_it_off(tmp_path):
  before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    directory = compile_cache.enable(str(tmp_path / "cache"))
    assert directory == str(tmp_path / "cache") and os.path.isdir(directory)
    assert jax.config.jax_compilation_cache_dir == directory
    assert jax.config.jax_enable_compilation_cache
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert compile_cache.enable("off") is None
    assert not jax.config.jax_enable_compilation_cache
  finally:
    for name, value in zip(("jax_enable_compilation_cache", "jax_compilation_cache_dir",
                            "jax_persistent_cache_min_compile_time_secs"), before):
      jax.config.update(name, value)
