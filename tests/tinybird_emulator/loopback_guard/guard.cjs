// Loopback guard for Node client subprocesses (the TypeScript SDK), loaded with
// NODE_OPTIONS="--require .../guard.cjs": every DNS lookup and TCP connection to a
// host other than loopback is refused before anything is sent, and each attempt,
// allowed or refused, is appended to $LOOPBACK_GUARD_LOG as one JSON line (the
// same format as sitecustomize.py beside this file).
"use strict";
const dns = require("node:dns");
const fs = require("node:fs");
const net = require("node:net");

const LOG = process.env.LOOPBACK_GUARD_LOG || "";
const LOCAL_NAMES = new Set(["", "localhost", "localhost.localdomain", "ip6-localhost"]);

function isLocal(host) {
  if (host === undefined || host === null) return true; // net's default host is localhost
  host = String(host).replace(/^\[|\]$/g, "");
  if (LOCAL_NAMES.has(host)) return true;
  if (net.isIPv4(host)) return host.startsWith("127.");
  if (net.isIPv6(host)) return host === "::1" || host.toLowerCase().startsWith("::ffff:127.");
  return false;
}

function record(kind, target, allowed) {
  if (!LOG) return;
  const line = JSON.stringify({ runtime: "node", pid: process.pid, kind, target, allowed });
  fs.appendFileSync(LOG, line + "\n");
}

const lookup = dns.lookup;
dns.lookup = function guardedLookup(hostname, options, callback) {
  const cb = typeof options === "function" ? options : callback;
  const allowed = isLocal(hostname);
  record("lookup", String(hostname), allowed);
  if (!allowed) {
    const err = Object.assign(new Error(`loopback guard: name lookup of ${hostname} refused`), {
      code: "ENOTFOUND",
      hostname,
    });
    process.nextTick(cb, err);
    return {};
  }
  return lookup.apply(this, arguments);
};
const promisesLookup = dns.promises.lookup;
dns.promises.lookup = async function guardedPromisesLookup(hostname, options) {
  const allowed = isLocal(hostname);
  record("lookup", String(hostname), allowed);
  if (!allowed) {
    throw Object.assign(new Error(`loopback guard: name lookup of ${hostname} refused`), { code: "ENOTFOUND" });
  }
  return promisesLookup.call(this, hostname, options);
};

const connect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function guardedConnect(...args) {
  let options = args[0];
  if (Array.isArray(options)) options = options[0]; // net's normalized [options, cb]
  if (typeof options !== "object" || options === null) options = { port: args[0], host: args[1] };
  if (options.path === undefined) {
    const target = `${options.host === undefined ? "localhost" : options.host}:${options.port}`;
    const allowed = isLocal(options.host);
    record("connect", target, allowed);
    if (!allowed) {
      const err = Object.assign(new Error(`loopback guard: connection to ${target} refused`), { code: "EACCES" });
      process.nextTick(() => this.destroy(err));
      return this;
    }
  }
  return connect.apply(this, args);
};
