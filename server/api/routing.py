"""The router's and the experiments' state: GET /v1/router, GET /v1/experiments,
POST /v1/experiments/reload, POST /v1/router/reload (after `knowmux router train`)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from ..errors import InvalidRequest
from ..router import ExperimentError
from .auth import require_admin, require_client
from .deps import get_runtime

router = APIRouter()


@router.get("/v1/router", dependencies=[Depends(require_client)])
async def router_state(rt=Depends(get_runtime)):
    return {"default_strategy": rt.settings.default_strategy, **rt.router.describe()}


@router.post("/v1/router/reload", dependencies=[Depends(require_admin)])
async def router_reload(rt=Depends(get_runtime)):
    await asyncio.to_thread(rt.router.load_classifier)
    state = rt.router.describe()
    if state["classifier_error"]:
        raise InvalidRequest(state["classifier_error"], param="classifier", code="invalid_classifier")
    return state


@router.get("/v1/experiments", dependencies=[Depends(require_client)])
async def experiments(rt=Depends(get_runtime)):
    return rt.experiments.describe()


@router.post("/v1/experiments/reload", dependencies=[Depends(require_admin)])
async def experiments_reload(rt=Depends(get_runtime)):
    try:
        await asyncio.to_thread(rt.experiments.reload)
    except ExperimentError as e:
        raise InvalidRequest(f"{e}; the previous configuration stays live", param="experiments",
                             code="invalid_experiments") from None
    return rt.experiments.describe()
