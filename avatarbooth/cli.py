"""The ``avatarbooth`` command: demo, chat, run, worker."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from avatarbooth.config import KNOWN_PRESETS, AppConfig, ConfigError, checked_metrics_port, load_config, secret
from avatarbooth.models import add_pull_arguments, pull, with_base_model

if TYPE_CHECKING:
    from avatarbooth.runtime import Running
    from bot.service import Reply, ResumedWork, UserRef

_log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avatarbooth", description="A chatbot that turns 3-5 selfies into a private personal image model."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", type=Path, default=None, help="config file (default: ./config.toml)")
        sub.add_argument("--preset", choices=KNOWN_PRESETS, default=None, help="model preset (overrides config)")
        sub.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
        return sub

    demo = command("demo", "run the scripted journey offline: consent, selfies, preview, train, draw")
    demo.add_argument("--out", type=Path, default=None, help="folder for the images (default: DATA/out/demo)")
    demo.add_argument("--json", action="store_true", help="end stdout with one JSON line: images and job ids")
    chat = command("chat", "chat with the bot in this terminal (commands from stdin, interactive or piped)")
    chat.add_argument("--out", type=Path, default=None, help="folder for the images (default: DATA/out/chat)")
    command("run", "serve Telegram and/or Discord (as enabled in config) with a worker and the embedded Valkey")
    worker = command("worker", "run a worker alone (for more GPUs or hosts); needs a Redis URL")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.add_argument(
        "--metrics-port", type=int, default=None, metavar="PORT",
        help="serve /metrics and /healthz on this port (0: none; default: [metrics] worker_port)",
    )
    evaluate = command("eval", "measure likeness: enrol each person's photos but one, train, draw, score against it")
    evaluate.add_argument("dir", type=Path, metavar="DIR", help="one sub-folder per person, each with 4 or more photos")
    evaluate.add_argument(
        "--methods", default="preview,lora,ti", help="any of preview, lora, ti, dreambooth (default: %(default)s)"
    )
    evaluate.add_argument("--json", action="store_true", help="end stdout with one JSON line: every number")
    models = commands.add_parser("models", help="fetch model weights", description="fetch model weights")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    pull = models_commands.add_parser(
        "pull", help="download and verify a preset's weights", description="download and verify a preset's weights"
    )
    pull.add_argument("--config", type=Path, default=None, help="config file (default: ./config.toml)")
    pull.add_argument("--preset", choices=KNOWN_PRESETS, default=None, help="which preset (default: config's)")
    pull.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    add_pull_arguments(pull)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if args.command == "worker" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config, preset=args.preset if args.preset else _default_preset(args))
    except ConfigError as e:
        print(f"avatarbooth: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "worker":
            return _run_worker(config, burst=args.burst, metrics_port=args.metrics_port)
        if args.command == "models":
            from avatarbooth.models import pull_eval

            code = _pull(config, antelopev2_zip=args.antelopev2_zip)
            return max(code, pull_eval(config.engine.models_dir)) if args.eval else code
        if args.command == "eval":
            from avatarbooth.eval import run_eval

            return run_eval(config, args.dir, methods=args.methods, as_json=args.json)
        if args.command == "run":
            return asyncio.run(_serve_platforms(config))
        if args.command == "demo":
            from avatarbooth.demo import run_demo

            return asyncio.run(run_demo(config, out_dir=args.out, as_json=args.json))
        return asyncio.run(_chat(config, out_dir=getattr(args, "out", None)))
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from avatarbooth.runtime import StartupError

        if isinstance(e, StartupError):
            print(f"avatarbooth: {e}", file=sys.stderr)
            return 1
        raise


def _default_preset(args: argparse.Namespace) -> str | None:
    # The demo is the offline showcase: it runs on the tiny models unless told otherwise.
    return "tiny" if args.command == "demo" and args.config is None else None


async def _chat(config: AppConfig, *, out_dir: Path | None) -> int:
    from avatarbooth.runtime import default_out_dir, serve_chat
    from bot.console import ConsoleAdapter
    from bot.service import UserRef

    async with serve_chat(config) as running:
        console = ConsoleAdapter(
            running.service,
            user=UserRef(platform="console", platform_user_id="local"),
            out_dir=out_dir or default_out_dir(config, "chat"),
            stdin=sys.stdin,
            stdout=sys.stdout,
        )
        return await console.run()


def _pull(config: AppConfig, *, antelopev2_zip: Path | None) -> int:
    preset = config.engine.preset
    components = None
    if config.base_model and preset in ("sdxl", "sd15"):
        components = with_base_model(preset, config.base_model)
    return pull(preset, config.engine.models_dir, antelopev2_zip=antelopev2_zip, components=components)


async def _serve_platforms(config: AppConfig) -> int:
    """Telegram and Discord together, on one service, until SIGINT/SIGTERM."""
    from avatarbooth.runtime import serve_chat
    from bot.service import ResumedWork

    tokens = {
        name: secret(env, os.environ)
        for name, env, enabled in (
            ("telegram", "TELEGRAM_TOKEN", config.telegram.enabled),
            ("discord", "DISCORD_TOKEN", config.discord.enabled),
        )
        if enabled
    }
    if not tokens:
        print(
            "avatarbooth: no chat platform is enabled: set enabled = true under [telegram] or [discord] "
            "in config.toml (to chat in this terminal, use `avatarbooth chat`)",
            file=sys.stderr,
        )
        return 2
    missing = [f"{name.upper()}_TOKEN" for name, token in tokens.items() if not token]
    if missing:
        print(f"avatarbooth: set {' and '.join(missing)} in the environment or in .env", file=sys.stderr)
        return 2
    async with serve_chat(config, serve_metrics=True) as running:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Serve at once; what a restart interrupted is finished meanwhile and sent as it is done.
        resumed = ResumedWork()
        resuming = asyncio.create_task(running.service.resume_all(deliver=resumed.put))
        resuming.add_done_callback(_report_resumed)
        serving = (_platform(name, token, running, stop, resumed) for name, token in tokens.items())
        try:
            await asyncio.gather(*serving)
        finally:
            resuming.cancel()
            await asyncio.gather(resuming, return_exceptions=True)
    return 0


def _report_resumed(task: asyncio.Task[dict[UserRef, Reply]]) -> None:
    if not task.cancelled() and task.exception() is None and task.result():
        _log.warning("finished the interrupted jobs of %d user(s)", len(task.result()))


async def _platform(
    name: str, token: str | None, running: Running, stop: asyncio.Event, resumed: ResumedWork
) -> None:
    """Serve one platform; a rejected token stops the start with a line saying which one."""
    assert token is not None
    from avatarbooth.runtime import StartupError

    service, config = running.service, running.config
    if name == "telegram":
        from bot.inbox import Inbox
        from bot.telegram.adapter import PLATFORM, TelegramStartError, serve_telegram

        try:
            await serve_telegram(
                service, Inbox(running.database, PLATFORM), config.telegram, token, stop=stop,
                webhook_secret=secret("TELEGRAM_WEBHOOK_SECRET", os.environ), resumed=resumed,
            )
        except TelegramStartError as e:
            raise StartupError(f"Telegram: {e}") from e
    else:
        from discord import LoginFailure

        from bot.discord.bot import serve_discord

        try:
            await serve_discord(service, config.discord, token, stop=stop, resumed=resumed)
        except LoginFailure as e:
            raise StartupError("Discord rejected DISCORD_TOKEN: check the bot token in the developer portal") from e


def _run_worker(config: AppConfig, *, burst: bool, metrics_port: int | None = None) -> int:
    if not config.engine.redis_url:
        print(
            "avatarbooth: a worker alone needs a queue server: set [queue] redis_url in config.toml "
            "or AVATARBOOTH_REDIS_URL (to try everything on one machine, use `avatarbooth chat`)",
            file=sys.stderr,
        )
        return 2
    try:
        port = config.metrics.worker_port if metrics_port is None else checked_metrics_port(metrics_port, "--metrics-port")
    except ConfigError as e:
        print(f"avatarbooth: {e}", file=sys.stderr)
        return 2
    from avatarbooth.metrics import MetricsError, serving
    from engine.errors import EngineError
    from engine.worker import run_worker
    from storage.errors import StorageError

    async def serve() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        async with AsyncExitStack() as stack:
            if port is not None:
                await stack.enter_async_context(
                    serving("worker", config.engine.redis_url, host=config.metrics.host, port=port)
                )
            await run_worker(config.engine, burst=burst)

    try:
        asyncio.run(serve())
    except asyncio.CancelledError:
        _log.info("worker stopped")
    except (EngineError, MetricsError, StorageError) as e:
        print(f"avatarbooth worker: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
