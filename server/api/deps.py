"""Thin accessors for what the lifespan put on app.state (tests override them)."""

from fastapi import Request


def get_runtime(request: Request):
    return request.app.state.runtime
