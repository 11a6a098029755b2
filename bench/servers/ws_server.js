// Node `ws` 8 peer server. echo: every message back to its sender;
// broadcast: every message to every connection (sender included).
// Usage: node ws_server.js --port 9021 --mode echo   (prints "READY <port>")
"use strict";
const { WebSocketServer } = require("ws");

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const port = Number(opt("--port", "9021"));
const mode = opt("--mode", "echo");

const wss = new WebSocketServer({ host: "127.0.0.1", port, perMessageDeflate: false, backlog: 4096 });
wss.on("connection", (ws) => {
  ws.on("error", () => {});
  ws.on("message", (data, isBinary) => {
    if (mode === "echo") {
      ws.send(data, { binary: isBinary });
      return;
    }
    for (const client of wss.clients) {
      if (client.readyState === 1) client.send(data, { binary: isBinary });
    }
  });
});
wss.on("listening", () => console.log(`READY ${wss.address().port}`));
