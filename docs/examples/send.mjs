// Send events to router from Node over its Unix socket, and read the acks (no packages needed).
import net from "node:net";
import readline from "node:readline";
import { randomUUID } from "node:crypto";

const socketPath = process.env.ROUTER_SOCKET ?? "router-data/router.sock";
const events = [];
for (let i = 0; i < 100; i++) {
  // A messageId of our own: if we ever resend, the daemon stores the event once.
  events.push({ type: "track", userId: "u1", event: "Item Viewed", properties: { item: i }, messageId: randomUUID() });
}

const socket = net.createConnection(socketPath);
const acks = readline.createInterface({ input: socket });
let answered = 0, acked = 0, refused = 0;
acks.on("line", (line) => {
  const ack = JSON.parse(line); // one ack per line we sent, in order
  if (ack.ok) acked += ack.count;
  else { refused += 1; console.error(`event ${answered} refused: ${ack.code}: ${ack.message}`); }
  if (++answered === events.length) socket.end();
});
socket.on("connect", () => socket.write(events.map((e) => JSON.stringify(e) + "\n").join("")));
socket.on("error", (err) => { console.error(err.message); process.exitCode = 2; });
socket.on("close", () => {
  console.log(`sent ${events.length}, acked ${acked}, refused ${refused}`);
  if (refused || acked < events.length) process.exitCode ||= 1;
});
