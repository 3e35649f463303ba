"""Shared click pieces: the error policy and parameter types used by every sub-command."""

from __future__ import annotations

import sys

import click

from epsstar.config import EpsstarError, parse_eps


class EpsstarGroup(click.Group):
    """Turns every :class:`EpsstarError` into one line on stderr and exit status 2.

    Expected user mistakes (bad eps, unknown dataset, missing files, unreachable tracking server)
    get no traceback; anything else is a bug and keeps its traceback.
    """

    def invoke(self, ctx: click.Context):  # noqa: D401 - click API
        try:
            return super().invoke(ctx)
        except EpsstarError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(2)


class EpsType(click.ParamType):
    """An attack strength written as ``0.0078`` or ``2/255`` (pixel units)."""

    name = "eps"

    def convert(self, value, param, ctx):  # noqa: D401 - click API
        if isinstance(value, float):
            return value
        try:
            return parse_eps(value)
        except EpsstarError as err:
            self.fail(str(err), param, ctx)


EPS = EpsType()


class EpsListType(click.ParamType):
    """A comma-separated list of attack strengths, e.g. ``0.25/255,0.5/255,1/255``."""

    name = "eps-list"

    def convert(self, value, param, ctx):  # noqa: D401 - click API
        if isinstance(value, (list, tuple)):
            return tuple(value)
        try:
            return tuple(parse_eps(v) for v in str(value).split(",") if v.strip())
        except EpsstarError as err:
            self.fail(str(err), param, ctx)


EPS_LIST = EpsListType()
