"""Settings objects pointed at the test servers, built from arguments, never from os.environ."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from orbion_common.infra import InfraUrls
from orbion_common.settings import CommonSettings

S = TypeVar("S", bound=CommonSettings)


def settings_for(urls: InfraUrls, cls: type[S], /, **overrides: Any) -> S:
    """``cls`` (CommonSettings or a service's Settings) with the test URLs and ``overrides``.

    Keyword arguments win over any ORBION_* variable of the developer's shell, so a test sees
    the same values everywhere.
    """
    values: dict[str, Any] = {
        "nats_url": urls.nats_url,
        "database_url": urls.database_url,
        "redis_url": urls.redis_url,
    }
    values.update(overrides)
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"])
    settings: S = cls(**values)
    return settings
