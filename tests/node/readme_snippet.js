// Node: load the contract straight from proto/ (npm install @grpc/grpc-js @grpc/proto-loader).
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const protoRoot = process.argv[2] || 'proto/proto';
const addr = process.argv[3] || '127.0.0.1:50051';
const definition = protoLoader.loadSync('trove/v1/artifacts.proto', { includeDirs: [protoRoot], defaults: true });
const { Artifacts } = grpc.loadPackageDefinition(definition).trove.v1;
const artifacts = new Artifacts(addr, grpc.credentials.createInsecure());

const put = artifacts.Put((err) => {
  if (err) throw err;
  const chunks = [];
  artifacts.Get({ namespace: 'demo', key: 'greeting' })
    .on('data', (message) => chunks.push(message.data))
    .on('end', () => console.log(Buffer.concat(chunks).toString()));
});
put.write({ header: { namespace: 'demo', key: 'greeting' }, data: Buffer.from('hello from Node') });
put.write({ finish: true }); // nothing is stored without it
put.end();
