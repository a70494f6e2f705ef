// Exercises every Trove service from Node with @grpc/grpc-js, loading the
// contract dynamically from proto/ with @grpc/proto-loader.
//
// Usage: node trove_check.js PROTO_ROOT HOST:PORT
// Prints one line per check and ends with "N passed, M failed".
'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [protoRoot, addr] = process.argv.slice(2);
const files = ['objects', 'artifacts', 'entries', 'cache'].map((f) => path.join('trove', 'v1', `${f}.proto`));
const definition = protoLoader.loadSync(files, { includeDirs: [protoRoot], longs: String, enums: String, defaults: true, oneofs: true });
const v1 = grpc.loadPackageDefinition(definition).trove.v1;
const credentials = grpc.credentials.createInsecure();
const options = { 'grpc.max_receive_message_length': 64 * 1024 * 1024 };
const objects = new v1.Objects(addr, credentials, options);
const artifacts = new v1.Artifacts(addr, credentials, options);
const entries = new v1.Entries(addr, credentials, options);
const cache = new v1.Cache(addr, credentials, options);
const ns = `node-${crypto.randomBytes(6).toString('hex')}`;

// Sends the messages of a client-streaming call and resolves with the reply.
function upload(client, method, messages) {
  return new Promise((resolve, reject) => {
    const call = client[method]((err, reply) => (err ? reject(err) : resolve(reply)));
    for (const message of messages) call.write(message);
    call.end();
  });
}

// Collects every message of a server-streaming call.
function collect(call) {
  return new Promise((resolve, reject) => {
    const messages = [];
    call.on('data', (m) => messages.push(m));
    call.on('error', reject);
    call.on('end', () => resolve(messages));
  });
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => client[method](request, (err, reply) => (err ? reject(err) : resolve(reply))));
}

const checks = {
  async objectsStreamLargeValue() {
    const data = crypto.randomBytes(5 * 1024 * 1024);
    const hash = crypto.createHash('sha256').update(data).digest('hex');
    const messages = [{ header: { namespace: ns, hash } }];
    for (let i = 0; i < data.length; i += 1 << 20) messages.push({ data: data.subarray(i, i + (1 << 20)) });
    messages.push({ finish: true });
    const reply = await upload(objects, 'Put', messages);
    assert.equal(reply.info.verified, true);
    const got = Buffer.concat((await collect(objects.Get({ namespace: ns, hash }))).map((m) => m.data));
    assert.ok(got.equals(data), 'object round trip');
    await assert.rejects(unary(objects, 'Stat', { namespace: ns, hash: 'missing' }), (e) => e.code === grpc.status.NOT_FOUND);
  },
  async artifactsRoundTrip() {
    await upload(artifacts, 'Put', [{ header: { namespace: ns, key: 'k' }, data: Buffer.from('node value') }, { finish: true }]);
    const got = Buffer.concat((await collect(artifacts.Get({ namespace: ns, key: 'k' }))).map((m) => m.data));
    assert.equal(got.toString(), 'node value');
    await assert.rejects(
      upload(artifacts, 'Put', [{ header: { namespace: ns, key: '' } }, { finish: true }]),
      (e) => e.code === grpc.status.INVALID_ARGUMENT && e.details.includes('key'),
    );
  },
  async entriesRoundTrip() {
    await unary(entries, 'Append', { namespace: ns, cassette: 'c', entries: [{ json: Buffer.from('{"n":2}'), recordedAt: 2 }, { json: Buffer.from('{"n":1}'), recordedAt: 1 }] });
    const read = (await collect(entries.Read({ namespace: ns, cassette: 'c' }))).flatMap((m) => m.entries.map((e) => JSON.parse(e.json).n));
    assert.deepEqual(read, [1, 2]);
  },
  async cacheRoundTrip() {
    const main = { namespace: ns, prefix: 'ci', branch: 'main', defaultBranch: 'main' };
    const pr = { ...main, branch: 'feature/y' };
    await upload(cache, 'Upload', [{ header: { scope: main, ref: 'c1' }, data: Buffer.from('archive') }, { finish: true }]);
    const replies = await collect(cache.Download({ scope: pr, ref: 'c1' }));
    assert.equal(replies[0].found, true);
    assert.equal(replies[0].served.tier, 'TIER_MAIN');
    assert.equal(Buffer.concat(replies.map((r) => r.data)).toString(), 'archive');
  },
};

(async () => {
  let passed = 0;
  let failed = 0;
  for (const [name, check] of Object.entries(checks)) {
    try {
      await check();
      passed += 1;
      console.log(`ok   ${name}`);
    } catch (err) {
      failed += 1;
      console.log(`FAIL ${name}: ${err && err.stack ? err.stack : err}`);
    }
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
})();
