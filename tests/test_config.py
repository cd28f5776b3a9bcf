"""config.toml and the environment, read into each package's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from avatarbooth.config import ConfigError, load_config, read_dotenv, secret

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_config_toml_loads_with_its_documented_defaults() -> None:
    config = load_config(ROOT / "config.toml", env={})
    assert config.engine.preset == "sdxl"
    assert config.redis_url is None  # embedded Valkey
    assert config.data_dir == ROOT / "data"
    assert config.bot.min_photos == 3 and config.bot.max_photos == 5
    assert config.bot.enabled_methods == ("lora", "ti")
    assert config.bot.class_word == "auto"  # by the photos' apparent genders
    assert config.bot.draw_num_images == 2
    assert not config.engine.random_flip and not config.engine.train_text_encoder
    assert config.engine.gradient_checkpointing is None  # the method and preset decide
    assert config.engine.dtype == "auto" and config.engine.dreambooth_optimizer == "adamw"
    assert config.engine.dreambooth_cache_bytes == 12 * 2**30


def test_training_switches_reach_the_engine_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[training]\nrandom_flip = true\ntrain_text_encoder = true\ngradient_checkpointing = false\n"
                    "keep_best_by_likeness = true\n")
    engine = load_config(path, env={}).engine
    assert engine.random_flip and engine.train_text_encoder and engine.gradient_checkpointing is False
    assert engine.keep_best_by_likeness
    assert not load_config(ROOT / "config.toml", env={}).engine.keep_best_by_likeness  # opt-in


def test_the_face_detail_pass_is_on_unless_switched_off(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[engine]\nface_detail = false\n")
    assert not load_config(path, env={}).engine.face_detail
    path.write_text("")
    assert load_config(path, env={}).engine.face_detail
    assert load_config(ROOT / "config.toml", env={}).engine.face_detail


def test_precision_memory_and_optimizer_settings_reach_the_engine(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[engine]\ndtype = "bfloat16"\ndreambooth_cache_gib = 0.5\n'
                    '[training]\ndreambooth_optimizer = "adafactor"\n')
    engine = load_config(path, env={}).engine
    assert engine.dtype == "bfloat16" and engine.dreambooth_cache_bytes == 2**29
    assert engine.dreambooth_optimizer == "adafactor"


def test_hotswap_and_compile_are_opt_in_and_reach_the_engine(tmp_path: Path) -> None:
    shipped = load_config(ROOT / "config.toml", env={}).engine
    assert not shipped.lora_hotswap and not shipped.compile_unet and shipped.hotswap_rank == 16
    path = tmp_path / "c.toml"
    path.write_text("[engine]\nlora_hotswap = true\nhotswap_rank = 32\ncompile_unet = true\n")
    engine = load_config(path, env={}).engine
    assert engine.lora_hotswap and engine.hotswap_rank == 32 and engine.compile_unet


def test_residency_routing_is_on_by_default_and_reaches_the_engine(tmp_path: Path) -> None:
    shipped = load_config(ROOT / "config.toml", env={}).engine
    assert (shipped.resident_loras, shipped.residency_wait_s) == (8, 1.0)
    path = tmp_path / "c.toml"
    path.write_text("[engine]\nresident_loras = 2\n[queue]\nresidency_wait_s = 0\n")
    engine = load_config(path, env={}).engine
    assert (engine.resident_loras, engine.residency_wait_s) == (2, 0.0)


def test_images_per_draw_sets_how_many_candidates_a_draw_ranks(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[limits]\nimages_per_draw = 1\n")
    assert load_config(path, env={}).bot.draw_num_images == 1


def test_relative_data_dir_is_relative_to_the_config_file_and_env_overrides_it(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "avatarbooth.toml"
    path.parent.mkdir()
    path.write_text('[storage]\ndata_dir = "state"\n[queue]\nredis_url = "redis://h:1/0"\n')
    assert load_config(path, env={}).data_dir == tmp_path / "conf" / "state"
    overridden = load_config(path, env={"AVATARBOOTH_DATA": str(tmp_path / "elsewhere")})
    assert overridden.data_dir == tmp_path / "elsewhere"
    assert overridden.engine.blobs_dir == tmp_path / "elsewhere" / "blobs"
    assert load_config(path, env={}).engine.redis_url == "redis://h:1/0"
    assert load_config(path, env={"AVATARBOOTH_REDIS_URL": "redis://x:2"}).redis_url == "redis://x:2"


def test_the_preset_flag_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[engine]\npreset = "sdxl"\n')
    assert load_config(path, preset="tiny", env={}).engine.preset == "tiny"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[engin]\n", "unknown section"),
        ('[engine]\npreset = "giant"\n', "unknown preset 'giant'"),
        ("[limits]\nmax_photos = -2\n", "max_photos must be positive"),
        ('[limits]\nmax_photos = "five"\n', "max_photos must be a int"),
        ("[limits]\nmax_fotos = 5\n", "max_fotos: unknown setting"),
        ("[queue]\nmax_jobs = 0\n", r"\[queue\] max_jobs must be a positive whole number, got 0; fix config.toml"),
        ("[limits]\nimages_per_draw = 9\n", "images per draw must be between 1 and 8, not 9"),
        ("[limits]\nmin_photos = 6\n", r"min_photos \(6\) must not exceed max_photos \(5\)"),
        ("[engine\n", "not valid TOML"),
        ('[training]\nrandom_flip = "yes"\n', "random_flip must be true or false"),
        ("[engine]\nface_detail = 1\n", r"\[engine\] face_detail must be true or false"),
        ('[engine]\ndtype = "half"\n', "dtype must be one of 'auto', 'float16', 'bfloat16', 'float32'"),
        ("[engine]\ndreambooth_cache_gib = -1\n", "dreambooth_cache_gib must be a number of GiB"),
        ('[training]\ndreambooth_optimizer = "sgd"\n', "dreambooth_optimizer must be one of 'adamw', 'adafactor'"),
        ("[engine]\nhotswap_rank = 0\n", "hotswap_rank must be a positive whole number"),
        ('[engine]\ncompile_unet = "on"\n', "compile_unet must be true or false"),
        ("[engine]\nresident_loras = 0\n", r"\[engine\] resident_loras must be a positive whole number"),
        ("[queue]\nresidency_wait_s = -1\n", r"\[queue\] residency_wait_s must be seconds from 0 \(off\) to 60"),
        ('[queue]\nresidency_wait_s = "1s"\n', r"\[queue\] residency_wait_s must be seconds"),
    ],
)
def test_bad_settings_are_named_with_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_secrets_come_from_the_environment_before_the_dotenv_file(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text('# tokens\nTELEGRAM_TOKEN="123:abc"\nexport DISCORD_TOKEN=xyz\n')
    assert read_dotenv(dotenv) == {"TELEGRAM_TOKEN": "123:abc", "DISCORD_TOKEN": "xyz"}
    assert secret("TELEGRAM_TOKEN", {}, dotenv) == "123:abc"
    assert secret("TELEGRAM_TOKEN", {"TELEGRAM_TOKEN": "999:env"}, dotenv) == "999:env"
    assert secret("MISSING", {}, dotenv) is None
    dotenv.write_text("not a pair\n")
    with pytest.raises(ConfigError, match=r"\.env:1: expected KEY=VALUE"):
        read_dotenv(dotenv)


def test_platform_sections_become_adapter_settings_and_refuse_tokens(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[telegram]\nenabled = true\nallowed_chats = [42, -100]\nbase_url = "http://127.0.0.1:1/bot"\n'
        'base_file_url = "http://127.0.0.1:1/file/bot"\n[discord]\nguild_ids = [7]\n'
    )
    config = load_config(path, env={})
    assert config.telegram.enabled and config.telegram.allowed_chats == (42, -100)
    assert config.discord.guild_ids == (7,) and not config.discord.enabled
    path.write_text('[telegram]\ntoken = "123:abc"\n')
    with pytest.raises(ConfigError, match="set TELEGRAM_TOKEN"):
        load_config(path, env={})
    path.write_text("[discord]\nguild_ids = [-3]\n")
    with pytest.raises(ConfigError, match="guild_ids must be server ids"):
        load_config(path, env={})
    path.write_text("[telegram]\nwebhook_prot = 1\n")
    with pytest.raises(ConfigError, match="webhook_prot: unknown setting"):
        load_config(path, env={})


def test_a_blocklist_file_extends_the_built_in_list(tmp_path: Path) -> None:
    (tmp_path / "blocked.txt").write_text("# ours\nbroccoli\n")
    path = tmp_path / "c.toml"
    path.write_text('[safety]\nblocklist_file = "blocked.txt"\nextra_blocked_terms = ["kale"]\n')
    blocklist = load_config(path, env={}).blocklist
    assert blocklist is not None
    assert blocklist.check("me eating broccoli") == "broccoli"
    assert blocklist.check("kale smoothie") == "kale"
    assert blocklist.check("me, nude") == "nude"  # the built-in terms stay
    path.write_text('[safety]\nblocklist_file = "missing.txt"\n')
    with pytest.raises(ConfigError, match="blocklist_file"):
        load_config(path, env={})
