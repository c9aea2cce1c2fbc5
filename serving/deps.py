"""What route handlers need, taken from the app state that the lifespan fills (nothing is built at import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import httpx
from fastapi import Depends, Request

from components.settings import Settings
from serving.adapters import AdapterManager
from serving.rag import Retriever
from serving.replicas import ReplicaPool


@dataclass
class Gateway:
    settings: Settings
    http: httpx.AsyncClient
    pool: ReplicaPool
    adapters: AdapterManager
    retriever: Retriever


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
