// Node over TLS with a token: TROVE_CA names the CA's PEM file, TROVE_TOKEN holds the token.
const fs = require('fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const protoRoot = process.argv[2] || 'proto/proto';
const addr = process.argv[3] || '127.0.0.1:50051';
const definition = protoLoader.loadSync('trove/v1/artifacts.proto', { includeDirs: [protoRoot], defaults: true });
const { Artifacts } = grpc.loadPackageDefinition(definition).trove.v1;
const bearer = grpc.credentials.createFromMetadataGenerator((_, callback) => {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${process.env.TROVE_TOKEN}`);
  callback(null, metadata);
});
const credentials = grpc.credentials.combineChannelCredentials(
  grpc.credentials.createSsl(fs.readFileSync(process.env.TROVE_CA)), bearer);
const artifacts = new Artifacts(addr, credentials);

const put = artifacts.Put((err) => {
  if (err) throw err;
  const chunks = [];
  artifacts.Get({ namespace: 'demo', key: 'greeting' })
    .on('data', (message) => chunks.push(message.data))
    .on('error', (e) => { throw e; })
    .on('end', () => console.log(Buffer.concat(chunks).toString()));
});
put.write({ header: { namespace: 'demo', key: 'greeting' }, data: Buffer.from('hello over TLS from Node') });
put.write({ finish: true }); // nothing is stored without it
put.end();
