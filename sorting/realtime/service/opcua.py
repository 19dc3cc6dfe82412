"""The OPC UA server of `sorting serve` (asyncua), in the web process's event loop.

Address space (namespace ``urn:sorting`` unless said otherwise)::

    Objects/
      Sorter                            BaseObjectType
        LinesTotal, ParticlesTotal, EjectsTotal, LateTotal, AlarmsTotal   UInt64, read-only
        Threshold                       Double; writable with credentials
        ModelFile                       String: the model in use
        Connected                       Boolean: a line stream connection is open
        DI:Identification               BaseObjectType (OPC 40001-1 MachineIdentification properties)
          DI:Manufacturer, DI:Model (LocalizedText), DI:SoftwareRevision, DI:SerialNumber,
          DI:ProductInstanceUri (String), ModelFile (String)
        Machinery:MachineryItemState    BaseObjectType
          CurrentState                  FiniteStateVariableType (LocalizedText):
                                        NotAvailable | OutOfService | NotExecuting | Executing
            Id (NodeId)                 the Machinery namespace's node of that state

The browse names of ``Identification`` and ``MachineryItemState`` and their children are
those of OPC 40001-1 (OPC UA for Machinery) and OPC 10000-100 (DI), in those namespaces'
URIs; the Machinery and DI type definitions themselves are not loaded, so the objects are
typed with the base types (BaseObjectType; FiniteStateMachineType is abstract) and ``CurrentState.Id``
names the Machinery state nodes by their published numeric ids.

Anyone may read (anonymous sessions). Writing ``Threshold`` needs a user name and the
token of ``--token-file`` as the password; an anonymous write is refused
(BadUserAccessDenied), a value outside [0, 1] too (BadOutOfRange). Only SecurityPolicy
None is offered: keep the server on loopback or a trusted control network.
"""
from __future__ import annotations

import asyncio
import hmac
import logging

from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from asyncua.common.instantiate_util import instantiate
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.user_managers import UserManager
from asyncua.ua.uaerrors import BadInternalError, BadOutOfRange, BadUserAccessDenied

from sorting.version import VERSION

NAMESPACE = "urn:sorting"
DI_NAMESPACE = "http://opcfoundation.org/UA/DI/"
MACHINERY_NAMESPACE = "http://opcfoundation.org/UA/Machinery/"
#: the state objects of MachineryItemState_StateMachineType in the Machinery nodeset
MACHINERY_STATE_IDS = {"OutOfService": 5004, "NotAvailable": 5005, "Executing": 5006, "NotExecuting": 5007}
#: seconds between copies of the loop's state into the address space
UPDATE_S = 0.25
COUNTERS = {"LinesTotal": "lines", "ParticlesTotal": "particles", "EjectsTotal": "ejects", "LateTotal": "late"}


class TokenUsers(UserManager):
    """Anonymous: read-only. A user name with the service's token as password: may write the
    threshold. Anything else is refused at session activation."""

    def __init__(self, token: str | None):
        self.token = token

    def get_user(self, iserver: InternalServer, username=None, password=None, certificate=None):
        if username is None and password is None:  # (the certificate is the client's application's)
            # asyncua lets the Anonymous role do nothing, not even read: an unnamed User reads,
            # and the pre-write check refuses it any write
            return User(role=UserRole.User, name=None)
        if self.token and username and isinstance(password, str) and \
                hmac.compare_digest(password.encode(), self.token.encode()):
            return User(role=UserRole.User, name=username)
        return None


class OpcUaServer:
    def __init__(self, cfg: dict, ask):
        self.cfg = cfg
        self.ask = ask  # coroutine: a setpoint request to the loop's process -> reply dict
        self.endpoint = cfg["opcua"]
        self.server = Server(user_manager=TokenUsers(cfg.get("token") or None))
        self.nodes: dict = {}
        self._last: dict = {}
        self._pump_task = None
        logging.getLogger("asyncua").setLevel(logging.ERROR)
        # a refused write is answered with a service fault, which asyncua logs as an error
        logging.getLogger("asyncua.server.uaprocessor").setLevel(logging.CRITICAL)

    async def start(self, hub) -> None:
        s = self.server
        await s.init()
        s.set_endpoint(self.endpoint)
        s.set_server_name("sorting serve")
        s.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        s.set_identity_tokens([ua.AnonymousIdentityToken, ua.UserNameIdentityToken])
        ns = await s.register_namespace(NAMESPACE)
        di = await s.register_namespace(DI_NAMESPACE)
        mach = await s.register_namespace(MACHINERY_NAMESPACE)
        self.mach_ns = mach
        sorter = await s.nodes.objects.add_object(ua.NodeId("Sorter", ns), ua.QualifiedName("Sorter", ns))
        n = self.nodes
        for name in (*COUNTERS, "AlarmsTotal"):
            n[name] = await sorter.add_variable(ua.NodeId(name, ns), ua.QualifiedName(name, ns),
                                                ua.Variant(0, ua.VariantType.UInt64))
        n["Threshold"] = await sorter.add_variable(ua.NodeId("Threshold", ns), ua.QualifiedName("Threshold", ns),
                                                   ua.Variant(0.0, ua.VariantType.Double))
        await n["Threshold"].set_writable(True)
        n["ModelFile"] = await sorter.add_variable(ua.NodeId("ModelFile", ns), ua.QualifiedName("ModelFile", ns),
                                                   ua.Variant(str(self.cfg.get("model", "")), ua.VariantType.String))
        n["Connected"] = await sorter.add_variable(ua.NodeId("Connected", ns), ua.QualifiedName("Connected", ns),
                                                   ua.Variant(False, ua.VariantType.Boolean))
        ident = await sorter.add_object(ua.NodeId("Sorter.Identification", ns), ua.QualifiedName("Identification", di))
        props = {
            "Manufacturer": ua.Variant(ua.LocalizedText(self.cfg.get("manufacturer", "sorting (open source)")),
                                       ua.VariantType.LocalizedText),
            "Model": ua.Variant(ua.LocalizedText("DE-XRT ore sorter"), ua.VariantType.LocalizedText),
            "SoftwareRevision": ua.Variant(f"sorting {VERSION}", ua.VariantType.String),
            "SerialNumber": ua.Variant(str(self.cfg.get("serial", "")), ua.VariantType.String),
            "ProductInstanceUri": ua.Variant(f"urn:sorting:{self.cfg.get('serial', 'sorter')}", ua.VariantType.String),
        }
        for name, value in props.items():
            await ident.add_property(ua.NodeId(f"Sorter.Identification.{name}", ns), ua.QualifiedName(name, di), value)
        n["Identification.ModelFile"] = await ident.add_property(
            ua.NodeId("Sorter.Identification.ModelFile", ns), ua.QualifiedName("ModelFile", ns),
            ua.Variant(str(self.cfg.get("model", "")), ua.VariantType.String))
        # FiniteStateMachineType is abstract: the object is a BaseObjectType holding the
        # state machine's CurrentState (a FiniteStateVariableType, with its Id)
        fsm = await sorter.add_object(ua.NodeId("Sorter.MachineryItemState", ns),
                                      ua.QualifiedName("MachineryItemState", mach))
        made = await instantiate(fsm, s.get_node(ua.NodeId(ua.ObjectIds.FiniteStateVariableType)),
                                 nodeid=ua.NodeId("Sorter.MachineryItemState.CurrentState", ns),
                                 bname=ua.QualifiedName("CurrentState", 0), dname=ua.LocalizedText("CurrentState"),
                                 idx=ns)
        n["CurrentState"] = s.get_node(made[0])
        n["CurrentState.Id"] = await n["CurrentState"].get_child("0:Id")
        await self._set_state("NotAvailable")
        s.iserver.callback_service.addListener(CallbackType.PreWrite, self._pre_write)
        await s.start()
        self._pump_task = asyncio.create_task(self._pump(hub))

    async def _pump(self, hub) -> None:
        while True:
            try:
                await self.update(hub)
            except Exception:  # a bad value must not stop the updates
                logging.getLogger(__name__).exception("OPC UA update failed")
            await asyncio.sleep(UPDATE_S)

    async def stop(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
        await self.server.stop()

    async def _set_state(self, state: str) -> None:
        n = self.nodes
        await n["CurrentState"].write_value(ua.Variant(ua.LocalizedText(state), ua.VariantType.LocalizedText))
        await n["CurrentState.Id"].write_value(ua.Variant(ua.NodeId(MACHINERY_STATE_IDS[state], self.mach_ns),
                                                          ua.VariantType.NodeId))

    async def _pre_write(self, event, dispatcher) -> None:
        """Every client write passes here first: only a signed-in user may set the threshold,
        and only to a value the loop accepts; the change then goes the same way as over HTTP."""
        if not event.is_external:  # the server's own updates
            return
        user = event.user
        thr = self.nodes["Threshold"].nodeid
        for wv in event.request_params.NodesToWrite:
            if wv.NodeId != thr or wv.AttributeId != ua.AttributeIds.Value:
                continue  # the node's access level refuses it
            if user is None or user.role not in (UserRole.User, UserRole.Admin) or not getattr(user, "name", None):
                raise BadUserAccessDenied()
            value = wv.Value.Value.Value if wv.Value is not None and wv.Value.Value is not None else None
            reply = await self.ask({"kind": "threshold", "value": value, "who": f"opcua {user.name}"})
            if not reply.get("ok"):
                raise BadOutOfRange() if reply.get("status") == 400 else BadInternalError()

    async def update(self, hub) -> None:
        """Copy the latest snapshot into the address space (only what changed)."""
        s = hub.snap
        values = {name: s.get(key, 0) for name, key in COUNTERS.items()}
        values["AlarmsTotal"] = sum(s.get("alarms", {}).values())
        n = self.nodes
        for name, v in values.items():
            if self._last.get(name) != v:
                await n[name].write_value(ua.Variant(int(v), ua.VariantType.UInt64))
                self._last[name] = v
        if s.get("threshold") is not None and self._last.get("Threshold") != s["threshold"]:
            await n["Threshold"].write_value(ua.Variant(float(s["threshold"]), ua.VariantType.Double))
            self._last["Threshold"] = s["threshold"]
        if self._last.get("model") != s.get("model"):
            for key in ("ModelFile", "Identification.ModelFile"):
                await n[key].write_value(ua.Variant(str(s.get("model")), ua.VariantType.String))
            self._last["model"] = s.get("model")
        if self._last.get("connected") != s.get("connected"):
            await n["Connected"].write_value(ua.Variant(bool(s.get("connected")), ua.VariantType.Boolean))
            self._last["connected"] = s.get("connected")
        if self._last.get("state") != s.get("state"):
            await self._set_state(s.get("state", "NotAvailable"))
            self._last["state"] = s.get("state")
