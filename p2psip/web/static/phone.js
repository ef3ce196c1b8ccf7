// The softphone: JsSIP over this peer's WebSocket listener. Strings from SIP (names, URIs, reasons) go into
// the page as text only. window.p2psipPhone exposes the state and the RTP counters for tests.
"use strict";

const $ = (id) => document.getElementById(id);
const phone = {
  state: "idle", registered: false, ua: null, session: null, muted: false, events: [], dtmfSent: 0, dtmfReceived: [],
};
window.p2psipPhone = phone;

function setCall(state, who) {
  phone.state = state;
  phone.events.push(state);
  $("call-state").textContent = state;
  if (who !== undefined) $("peer-name").textContent = who;
  const inCall = phone.session !== null && !["ended", "failed"].includes(state);
  $("call").disabled = !phone.registered || inCall;
  $("answer").disabled = state !== "incoming";
  $("hangup").disabled = !inCall;
  $("mute").disabled = state !== "established";
  for (const b of document.querySelectorAll("#keypad button")) b.disabled = state !== "established";
}

phone.inboundPackets = async function inboundPackets() {
  // RTP received on this end: inbound-rtp packetsReceived of the call's RTCPeerConnection.
  const pc = phone.session && phone.session.connection;
  if (!pc) return 0;
  let total = 0;
  (await pc.getStats()).forEach((report) => {
    if (report.type === "inbound-rtp") total += report.packetsReceived || 0;
  });
  return total;
};

function attachSession(session) {
  phone.session = session;
  const who = session.remote_identity ? session.remote_identity.uri.toString() : "";
  session.on("progress", () => setCall(session.direction === "incoming" ? "incoming" : "ringing", who));
  session.on("accepted", () => setCall("established", who));
  session.on("confirmed", () => setCall("established", who));
  session.on("ended", (e) => { setCall("ended", `${who} (${e.cause})`); phone.session = null; setCall("ended"); });
  session.on("failed", (e) => { setCall("failed", `${who} (${e.cause})`); phone.session = null; setCall("failed"); });
  session.on("peerconnection", (e) => hookAudio(e.peerconnection));
  session.on("newDTMF", (e) => { if (e.originator === "remote") phone.dtmfReceived.push(e.dtmf.tone); });
  if (session.connection) hookAudio(session.connection);
}

function hookAudio(pc) {
  pc.addEventListener("track", (event) => {
    const audio = $("remote-audio");
    if (event.streams && event.streams[0]) audio.srcObject = event.streams[0];
  });
}

function register() {
  const aor = $("aor").value.trim();
  if (!/^sips?:[^@\s]+@[^@\s]+$/.test(aor)) {
    $("reg-state").textContent = "write an AOR like sip:alice@p2p.example";
    return;
  }
  if (phone.ua) phone.ua.stop();
  const socket = new JsSIP.WebSocketInterface(phone.config.ws);
  const ua = new JsSIP.UA({
    sockets: [socket],
    uri: aor,
    register: true,
    register_expires: 600,
    session_timers: false,
    user_agent: "p2psip-phone (JsSIP)",
  });
  phone.ua = ua;
  ua.on("registered", () => { phone.registered = true; $("reg-state").textContent = `registered as ${aor}`; setCall(phone.state); });
  ua.on("unregistered", () => { phone.registered = false; $("reg-state").textContent = "not registered"; setCall(phone.state); });
  ua.on("registrationFailed", (e) => { phone.registered = false; $("reg-state").textContent = `registration failed (${e.cause})`; });
  ua.on("disconnected", () => { $("reg-state").textContent = "disconnected from the peer"; });
  ua.on("newRTCSession", (e) => {
    if (phone.session && e.originator === "remote") { e.session.terminate({ status_code: 486 }); return; }
    attachSession(e.session);
    if (e.originator === "remote") setCall("incoming", e.session.remote_identity.uri.toString());
  });
  ua.start();
}

function call() {
  const target = $("target").value.trim();
  if (!phone.ua || !target) return;
  setCall("calling", target);
  phone.ua.call(target, {
    mediaConstraints: { audio: true, video: false },
    pcConfig: { iceServers: [] },
    eventHandlers: {},
  });
}

function answer() {
  if (phone.session) phone.session.answer({ mediaConstraints: { audio: true, video: false }, pcConfig: { iceServers: [] } });
}

function hangup() {
  if (phone.session) phone.session.terminate();
}

function toggleMute() {
  if (!phone.session) return;
  if (phone.muted) phone.session.unmute({ audio: true }); else phone.session.mute({ audio: true });
  phone.muted = !phone.muted;
  $("mute").textContent = phone.muted ? "Unmute" : "Mute";
}

function dtmf(tone) {
  if (phone.session && phone.state === "established") {
    phone.session.sendDTMF(tone);
    phone.dtmfSent += 1;
  }
}

async function start() {
  JsSIP.debug.disable("JsSIP:*");
  const keypad = $("keypad");
  for (const tone of "123456789*0#") {
    const b = document.createElement("button");
    b.textContent = tone;
    b.disabled = true;
    b.addEventListener("click", () => dtmf(tone));
    keypad.appendChild(b);
  }
  $("register").addEventListener("click", register);
  $("call").addEventListener("click", call);
  $("answer").addEventListener("click", answer);
  $("hangup").addEventListener("click", hangup);
  $("mute").addEventListener("click", toggleMute);
  phone.config = await (await fetch("/phone/config.json")).json();
  const problems = $("problems");
  for (const text of phone.config.problems) {
    const li = document.createElement("li");
    li.textContent = text;
    problems.appendChild(li);
  }
  if (!phone.config.ws || phone.config.problems.length) $("register").disabled = true;
  phone.ready = true;
}

document.addEventListener("DOMContentLoaded", start);
