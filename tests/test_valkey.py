"""The embedded Valkey server: a real server, reachable only with its data folder's password."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from avatarbooth.valkey import PASSWORD_FILE, EmbeddedValkey


def test_the_embedded_server_refuses_clients_without_the_folders_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="avatarbooth.valkey")
    with EmbeddedValkey(tmp_path / "valkey") as server:
        parts = urlsplit(server.url)
        assert parts.hostname == "127.0.0.1" and parts.password
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=parts.hostname, port=parts.port).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=parts.hostname, port=parts.port, password="guess").ping()
        assert redis.Redis.from_url(server.url).ping()
        first = parts.password
    assert first not in caplog.text  # the log names the file, never the password
    password_file = tmp_path / "valkey" / PASSWORD_FILE
    assert stat.S_IMODE(os.stat(password_file).st_mode) == 0o600
    assert password_file.read_text().strip() == first

    with EmbeddedValkey(tmp_path / "valkey") as again:  # a restart keeps the folder's password
        assert urlsplit(again.url).password == first
    with EmbeddedValkey(tmp_path / "other") as other:  # another data folder, another password
        assert urlsplit(other.url).password != first
