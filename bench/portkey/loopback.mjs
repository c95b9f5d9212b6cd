// Preloaded with `node --import` before the Portkey gateway's own build/start-server.js, which
// calls @hono/node-server's serve({fetch, port}) with no hostname: Node would then listen on
// every interface (`::`), and the gateway has no flag or variable for the bind address. This
// makes a listen() that names no host bind 127.0.0.1 (or $PORTKEY_BIND_HOST) instead; calls
// that name one are left alone.
import net from "node:net";

const host = process.env.PORTKEY_BIND_HOST || "127.0.0.1";
const listen = net.Server.prototype.listen;

net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" || (typeof args[0] === "string" && /^\d+$/.test(args[0]))) {
    if (args.length === 1 || typeof args[1] === "function" || args[1] === undefined) {
      args.splice(1, args[1] === undefined && args.length > 1 ? 1 : 0, host);
    }
  } else if (args[0] && typeof args[0] === "object" && args[0].port !== undefined
             && !args[0].host && !args[0].path) {
    args[0] = { ...args[0], host };
  }
  return listen.apply(this, args);
};
