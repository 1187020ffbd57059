"""The AKS simulator over HTTPS: ARM agent-pool routes, long-running operation resources, the two
Microsoft Entra endpoints a client-credentials login needs, faults, and a request log."""

from __future__ import annotations

import json
import random
import re
import secrets
import socket
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes

from gpu_provisioner.pki import CertificateAuthority
from gpu_provisioner.sim.aks import Aks, ArmError, Operation
from gpu_provisioner.sim.nodes import NodeMaterialiser
from gpu_provisioner.sim.scenario import Scenario
from gpu_provisioner.sim.timeline import Step

_PROVIDER = r"/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/microsoft\.containerservice"
_ROUTES = [
    ("agentpools", re.compile(_PROVIDER + r"/managedclusters/(?P<cluster>[^/]+)/agentpools/(?P<pool>[^/]+)$", re.I)),
    ("agentpools.list", re.compile(_PROVIDER + r"/managedclusters/(?P<cluster>[^/]+)/agentpools$", re.I)),
    ("managedclusters.get", re.compile(_PROVIDER + r"/managedclusters/(?P<cluster>[^/]+)$", re.I)),
    ("skus.list", re.compile(r"/subscriptions/(?P<sub>[^/]+)/providers/microsoft\.compute/skus$", re.I)),
    ("usages.list", re.compile(
        r"/subscriptions/(?P<sub>[^/]+)/providers/microsoft\.compute/locations/(?P<location>[^/]+)/usages$", re.I)),
    ("operations.get", re.compile(
        r"/subscriptions/(?P<sub>[^/]+)/providers/microsoft\.containerservice/locations/[^/]+"
        r"/(?P<what>operations|operationresults)/(?P<op>[^/]+)$", re.I)),
]
_OPENID = re.compile(r"^/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration$")
_TOKEN = re.compile(r"^/(?P<tenant>[^/]+)/oauth2/v2\.0/token$")


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    status: int  # 0: connection dropped without a response
    duration_s: float
    operation: str
    user_agent: str


class AksSimulator:
    def __init__(self, scenario: Scenario | None = None, kube_api: kubernetes.client.ApiClient | None = None,
                 clusters: tuple[str, ...] = ("kaito-cluster",)) -> None:
        self.scenario = scenario or Scenario()
        self.subscription_id = str(uuid.UUID(int=random.Random(self.scenario.seed).getrandbits(128)))
        self.resource_group = "kaito-rg"
        self.location = "eastus"
        self.cluster_name = clusters[0]
        self.node_resource_group = f"MC_{self.resource_group}_{self.cluster_name}_{self.location}"
        self.tenant_id = "72f988bf-0000-4000-8000-00000000aks0"
        self.client_id = "gpu-provisioner-sim-client"
        self.client_secret = secrets.token_urlsafe(16)
        self.aks = Aks(self.scenario, self.subscription_id, self.resource_group, self.location, clusters)
        self._rng = random.Random(self.scenario.seed)
        self._tokens: set[str] = set()
        self._records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._dir = Path(tempfile.mkdtemp(prefix="aks-sim-"))
        self.ca_bundle = self._dir / "ca.crt"
        self._nodes: NodeMaterialiser | None = None
        if kube_api is not None:
            nodes = self._nodes = NodeMaterialiser(kube_api, self.scenario, self.subscription_id, self.aks.settle,
                                                   self.aks.timeline)
            self.aks.on_pool_created = lambda cluster, pool: nodes.pool_created(
                cluster, self.aks.node_resource_group(cluster), self.location, pool)
            self.aks.on_pool_deleted = nodes.pool_deleted
            self.aks.on_operation_started = nodes.wake
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> AksSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, port: int = 0) -> None:
        ca = CertificateAuthority("aks-simulator-ca")
        self.ca_bundle.write_bytes(ca.cert_pem)
        cert, key = ca.issue_server("aks-simulator", ["127.0.0.1", "localhost"]).write(self._dir, "server")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.endpoint = f"https://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, name="aks-sim-http", daemon=True)
        self._thread.start()
        if self._nodes is not None:
            self._nodes.start()

    def stop(self) -> None:
        if self._nodes is not None:
            self._nodes.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for path in self._dir.iterdir():
            path.unlink()
        self._dir.rmdir()

    # for controllers, tests and benchmarks ----------------------------------------------------

    def azure_environment(self) -> dict[str, str]:
        """What a controller process needs to reach this simulator exactly as it reaches Azure."""
        return {
            "ARM_SUBSCRIPTION_ID": self.subscription_id, "ARM_RESOURCE_GROUP": self.resource_group,
            "AZURE_CLUSTER_NAME": self.cluster_name, "LOCATION": self.location,
            "AZURE_TENANT_ID": self.tenant_id, "AZURE_CLIENT_ID": self.client_id,
            "AZURE_CLIENT_SECRET": self.client_secret, "AZURE_AUTHORITY_HOST": self.endpoint,
            # An authority Microsoft does not know: MSAL must not ask login.microsoftonline.com about it.
            "AZURE_DISABLE_INSTANCE_DISCOVERY": "true",
            "ARM_ENDPOINT": self.endpoint, "REQUESTS_CA_BUNDLE": str(self.ca_bundle),
        }

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def count_requests(self, operation: str | None = None, status: int | None = None) -> int:
        return sum(1 for r in self.requests
                   if (operation is None or r.operation == operation) and (status is None or r.status == status))

    def creations(self, cluster: str | None = None) -> dict[str, int]:
        """How many pools PUTs created under each name, answered or not (a PUT whose answer was lost or that
        met a pool already there is not told apart by its status alone)."""
        cluster = cluster or self.cluster_name
        with self.aks.lock:
            return {name: n for (c, name), n in self.aks.creations.items() if c == cluster}

    def pools(self, cluster: str | None = None) -> dict[str, dict[str, Any]]:
        body = self.aks.list_pools(cluster or self.cluster_name)
        return {pool["name"]: pool for pool in body["value"]}

    def timeline(self, cluster: str | None = None) -> dict[str, dict[str, Step]]:
        """Per pool, when each scenario step (sim.timeline: PUT, CREATED, NODE_JOINED...) was due and when it
        happened, in time.monotonic(): the simulator's own lag."""
        return self.aks.timeline.pools(cluster or self.cluster_name)

    def update_scenario(self, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(self.scenario, name, value)

    @property
    def kubelet(self) -> NodeMaterialiser:
        """The kubelet stand-in, to make a node in service fail (lose_gpus, lose_node) or recover."""
        if self._nodes is None:
            raise RuntimeError("this simulator materialises no nodes (started without kube_api)")
        return self._nodes

    def set_cluster_power(self, cluster: str, power: str) -> None:
        self.aks.set_cluster_power(cluster, power)

    def seed_pool(self, name: str, vm_size: str = "Standard_NC6s_v3", tags: dict[str, str] | None = None,
                  cluster: str | None = None, node_labels: dict[str, str] | None = None) -> dict[str, Any]:
        return self.aks.seed_pool(cluster or self.cluster_name, name, vm_size, tags or {}, node_labels or {})

    # request handling -------------------------------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def _fault(self) -> str | None:
        s = self.scenario
        with self._lock:
            roll = self._rng.random()
        if roll < s.drop_rate:
            return "drop"
        if roll < s.drop_rate + s.throttle_rate:
            return "throttle"
        if roll < s.drop_rate + s.throttle_rate + s.server_error_rate:
            return "error"
        return None

    def lose_create_answer(self) -> bool:
        """Whether this PUT's answer is to be lost (it was carried out all the same)."""
        with self._lock:
            if self.scenario.lost_create_answers <= 0:
                return False
            self.scenario.lost_create_answers -= 1
            return True

    def issue_token(self) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens.add(token)
        return token

    def issued_tokens(self) -> set[str]:
        with self._lock:
            return set(self._tokens)

    def token_valid(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        with self._lock:
            return header.removeprefix("Bearer ") in self._tokens

    def authorize(self, operation: str, path: str) -> None:
        """Azure RBAC: 403 AuthorizationFailed, in ARM's words, for an action the scenario denies."""
        action = _RBAC_ACTIONS.get(operation)
        if action in self.scenario.denied_actions:
            scope = path.split("/agentPools", 1)[0] if "/providers/Microsoft.Compute/" not in path else \
                f"/subscriptions/{self.subscription_id}"
            raise ArmError(403, "AuthorizationFailed", f"The client '{self.client_id}' with object id "
                           f"'{self.client_id}' does not have authorization to perform action '{action}' over scope "
                           f"'{scope}' or the scope is invalid. If access was recently granted, please refresh your "
                           "credentials.")

    def operation_headers(self, operation: Operation, location: bool) -> dict[str, str]:
        """The headers of an answer that started `operation`: where to poll it (Azure-AsyncOperation, and the
        Location of its result when `location`), and, as on real AKS, the operation's id as x-ms-request-id.
        Retry-After is the simulator's own, so SDK pollers do not wait 30 s between polls."""
        base = (f"{self.endpoint}/subscriptions/{self.subscription_id}/providers/Microsoft.ContainerService"
                f"/locations/{self.location}")
        headers = {
            "Azure-AsyncOperation": f"{base}/operations/{operation.id}?api-version=2017-08-31",
            "x-ms-request-id": operation.id,
            "Retry-After": str(self.scenario.poll_retry_after_s),
        }
        if location:
            headers["Location"] = f"{base}/operationresults/{operation.id}?api-version=2017-08-31"
        return headers


def _handler_for(sim: AksSimulator) -> type[BaseHTTPRequestHandler]:
    class Handler(_ArmHandler):
        simulator = sim

    return Handler


_CLUSTERS_ACTION = "Microsoft.ContainerService/managedClusters"
_RBAC_ACTIONS = {
    "managedclusters.get": f"{_CLUSTERS_ACTION}/read",
    "agentpools.list": f"{_CLUSTERS_ACTION}/agentPools/read",
    "agentpools.get": f"{_CLUSTERS_ACTION}/agentPools/read",
    "agentpools.create": f"{_CLUSTERS_ACTION}/agentPools/write",
    "agentpools.delete": f"{_CLUSTERS_ACTION}/agentPools/delete",
    "skus.list": "Microsoft.Compute/skus/read",
    "usages.list": "Microsoft.Compute/locations/usages/read",
}


class _ArmHandler(BaseHTTPRequestHandler):
    simulator: AksSimulator
    protocol_version = "HTTP/1.1"
    # A reply goes out as two writes (headers, then body). With Nagle's algorithm on, the body waited for the
    # client's delayed ACK of the headers: 40 ms on every answer with a body, which ARM's front door does not add.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # the request log replaces stderr noise
        return

    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        started = time.monotonic()
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self._reply: tuple[int, dict[str, str], bytes] | None = None
        operation, status = self._dispatch(url.path, parse_qs(url.query), raw)
        if operation in ("agentpools.create", "agentpools.delete"):
            time.sleep(self.simulator.scenario.write_answer_delay_s)
        if operation == "agentpools.create" and status in (200, 201) and self.simulator.lose_create_answer():
            self._reply, status = None, 0
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        # Recorded before the reply leaves, so a client that has its answer always finds it in the log.
        self.simulator._record(RequestRecord(self.command, url.path, status, time.monotonic() - started, operation,
                                                 self.headers.get("User-Agent", "")))
        if self._reply is not None:
            self._write(*self._reply)

    def _dispatch(self, path: str, query: dict[str, list[str]], raw: bytes) -> tuple[str, int]:
        sim = self.simulator
        if self.command == "GET" and (match := _OPENID.match(path)):
            return "openid-configuration", self._send(200, _openid_configuration(sim.endpoint, match["tenant"]))
        if self.command == "POST" and _TOKEN.match(path):
            form = parse_qs(raw.decode())
            if form.get("client_secret", [""])[0] != sim.client_secret:
                return "token", self._send(401, {"error": "invalid_client",
                                                 "error_description": "AADSTS7000215: Invalid client secret provided."})
            return "token", self._send(200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                                             "access_token": sim.issue_token()})
        name, match = next(((n, m) for n, pattern in _ROUTES if (m := pattern.match(path))), ("unknown", None))
        if name == "agentpools":
            name = {"PUT": "agentpools.create", "DELETE": "agentpools.delete"}.get(self.command, "agentpools.get")
        fault = sim._fault()
        if fault == "drop":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return name, 0
        try:
            if not sim.token_valid(self.headers.get("Authorization")):
                raise ArmError(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is "
                               "missing or the token is invalid.")
            sim.authorize(name, path)
            if fault == "throttle":
                after = sim.scenario.retry_after_s
                raise _Throttled(after)
            if fault == "error":
                raise ArmError(503, "ServiceUnavailable", "The service is temporarily unavailable; retry later.")
            if match is None:
                raise ArmError(404, "InvalidResourceType", f"The resource type could not be found for {path}.")
            if "api-version" not in query:
                raise ArmError(400, "MissingApiVersionParameter", "The api-version query parameter (?api-version=) "
                               "is required for all requests.")
            return name, self._route(name, match, query, raw)
        except _Throttled as throttled:
            return name, self._send(429, {"error": {
                "code": "SubscriptionRequestsThrottled",
                "message": f"Number of requests for subscription '{sim.subscription_id}' exceeded the limit. "
                           f"Please try again after '{throttled.after}' seconds.",
            }}, {"Retry-After": str(throttled.after)})
        except ArmError as error:
            return name, self._send(error.status, error.body())

    def _route(self, name: str, match: re.Match[str], query: dict[str, list[str]], raw: bytes) -> int:
        sim, aks = self.simulator, self.simulator.aks
        if name == "skus.list":
            return self._send(200, {"value": [sku for sku in aks.resource_skus() if _matches(query, sku)]})
        if name == "usages.list":
            offered = match["location"].lower() == sim.location.lower()
            return self._send(200, {"value": aks.usages() if offered else []})
        if name == "operations.get":
            operation = aks.operation(match["op"])
            if match["what"].lower() == "operations":
                # The shape real AKS answers with: name, status, startTime, endTime once done (no id).
                body = {"name": operation.id, "status": operation.status, "startTime": operation.started}
                if operation.ended:
                    body["endTime"] = operation.ended
                if operation.error:
                    body["error"] = operation.error
                return self._send(200, body)
            if operation.status == "InProgress":
                return self._send(202, None, sim.operation_headers(operation, location=True))
            if operation.error:
                return self._send(400, {"error": operation.error})
            return self._send(200, operation.result) if operation.result else self._send(204, None)
        cluster = match["cluster"]
        if name == "managedclusters.get":
            return self._send(200, aks.cluster(cluster))
        if name == "agentpools.list":
            return self._send(200, aks.list_pools(cluster))
        pool = match["pool"]
        if name == "agentpools.get":
            return self._send(200, aks.get_pool(cluster, pool))
        if name == "agentpools.create":
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError as error:
                raise ArmError(400, "InvalidRequestContent", f"The request content was invalid: {error}") from None
            status, pool_body, operation = aks.put_pool(cluster, pool, body)
            # Real AKS answers a create with Azure-AsyncOperation only, a delete with Location as well.
            headers = sim.operation_headers(operation, location=False) if operation else None
            return self._send(status, pool_body, headers)
        operation = aks.delete_pool(cluster, pool)
        if operation is None:
            return self._send(204, None)
        return self._send(202, None, sim.operation_headers(operation, location=True))

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> int:
        payload = b"" if body is None else json.dumps(body).encode()
        self._reply = (status, headers or {}, payload)
        return status

    def _write(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        request_id = headers.pop("x-ms-request-id", None) or str(uuid.uuid4())
        self.send_header("x-ms-request-id", request_id)
        self.send_header("x-ms-correlation-request-id", self.headers.get("x-ms-client-request-id") or request_id)
        if payload:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)


class _Throttled(Exception):
    def __init__(self, after: int) -> None:
        super().__init__(after)
        self.after = after


def _matches(query: dict[str, list[str]], sku: dict[str, Any]) -> bool:
    """ARM's `$filter=location eq '<region>'` on the Resource SKUs list (the one filter it supports)."""
    wanted = re.search(r"location eq '([^']+)'", query.get("$filter", [""])[0], re.IGNORECASE)
    return wanted is None or wanted[1].lower() in {loc.lower() for loc in sku["locations"]}


def _openid_configuration(endpoint: str, tenant: str) -> dict[str, Any]:
    return {
        "issuer": f"{endpoint}/{tenant}/v2.0",
        "authorization_endpoint": f"{endpoint}/{tenant}/oauth2/v2.0/authorize",
        "token_endpoint": f"{endpoint}/{tenant}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
        "response_types_supported": ["code", "id_token", "token"],
        "tenant_region_scope": "NA",
    }
