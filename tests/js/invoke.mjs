// Drives the running local stack with the real Supabase clients, as the web app would, and prints
// what it observed as one JSON object on stdout. tests/test_supabase_js.py starts the stack,
// runs this with the values of .local/stack.env in the environment, and asserts on the result.
// Observations, not assertions, live here so that a failure shows everything that was seen.

import { FunctionsClient, FunctionsHttpError } from '@supabase/functions-js';
import { createClient } from '@supabase/supabase-js';
import { corsHeaders } from '@supabase/supabase-js/cors';
import ws from 'ws';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const FUNCTIONS_URL = env('FUNCTIONS_URL');
const STACK_URL = env('STACK_URL');
const JWT = env('DEMO_USER_JWT');
const ANON_KEY = env('SUPABASE_ANON_KEY');
const TOOLBOX_ID = env('DEMO_TOOLBOX_ID');
const TOOLBOX_TOKEN = env('DEMO_TOOLBOX_TOKEN');
const suffix = Math.random().toString(16).slice(2, 8);

// One invoke, reduced to what the test checks: the status, whether `error` is null, the data, and
// for a FunctionsHttpError the status and JSON body found on `error.context`.
async function observe(promise) {
  const { data, error, response } = await promise;
  const seen = {
    status: response ? response.status : null,
    contentType: response ? response.headers.get('content-type') : null,
    error: null,
    data,
  };
  if (error) {
    seen.error = { name: error.name, isHttpError: error instanceof FunctionsHttpError, message: error.message };
    if (error instanceof FunctionsHttpError) {
      seen.error.contextStatus = error.context.status;
      seen.error.body = await error.context.json();
    }
  }
  return seen;
}

// A deploy answers 202 at once; the web app then polls mcp_status until the worker has recorded
// the outcome (or, with Realtime, waits for the row to change).
async function untilSettled(invokeStatus, id) {
  for (let i = 0; i < 150; i += 1) {
    const seen = await observe(invokeStatus(id));
    const status = seen.data && seen.data.server && seen.data.server.status;
    if (status && status !== 'deploying' && status !== 'pending_deploy') return seen;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return observe(invokeStatus(id));
}

async function withFunctionsClient() {
  const functions = new FunctionsClient(FUNCTIONS_URL, { headers: { Authorization: `Bearer ${JWT}` } });
  const out = {};
  const name = `js-fc-${suffix}`;
  out.deploy = await observe(
    functions.invoke('deploy_mcp_server', {
      body: { toolbox_id: TOOLBOX_ID, name, image: 'mcp/everything:latest' },
      headers: { 'Idempotency-Key': `js-fc-deploy-${suffix}` },
    }),
  );
  const id = out.deploy.data && out.deploy.data.id;
  out.statusOne = await untilSettled((sid) => functions.invoke('mcp_status', { body: { id: sid } }), id);
  out.statusGet = await observe(functions.invoke(`mcp_status?id=${id}`, { method: 'GET' }));
  out.stop = await observe(functions.invoke('manage_mcp_server', { body: { instance_id: id, action: 'stop' } }));
  out.start = await observe(functions.invoke('manage_mcp_server', { body: { instance_id: id, action: 'start' } }));
  out.unknownField = await observe(
    functions.invoke('deploy_mcp_server', { body: { toolbox_id: TOOLBOX_ID, name, imagee: 'typo' } }),
  );
  out.remove = await observe(functions.invoke('manage_mcp_server', { body: { instance_id: id, action: 'remove' } }));
  out.goneAfterRemove = await observe(functions.invoke('mcp_status', { body: { id } }));
  const anonymous = new FunctionsClient(FUNCTIONS_URL);
  out.noToken = await observe(anonymous.invoke('mcp_status'));
  // A 204 without a JSON type is a success with empty data (a JSON-typed 204 would fail to parse).
  const agent = new FunctionsClient(FUNCTIONS_URL, { headers: { Authorization: `Bearer ${TOOLBOX_TOKEN}` } });
  out.heartbeat = await observe(
    agent.invoke('dtma_heartbeat_ingest/heartbeat', {
      body: { dtma_version: '0.1.0', system_status: {}, tool_statuses: [] },
    }),
  );
  return out;
}

async function withSupabaseJs() {
  // Node 20 has no global WebSocket: supabase-js 2.109 needs `ws` passed as the realtime transport.
  const supabase = createClient(STACK_URL, ANON_KEY, {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    realtime: { transport: ws },
  });
  const auth = { Authorization: `Bearer ${JWT}` };
  const out = {};
  const name = `js-sb-${suffix}`;
  out.deploy = await observe(
    supabase.functions.invoke('deploy_mcp_server', {
      headers: auth,
      body: { toolboxId: TOOLBOX_ID, instanceNameOnToolbox: name, dockerImage: 'mcp/everything:latest' },
    }),
  );
  const id = out.deploy.data && out.deploy.data.id;
  out.settled = await untilSettled((sid) => supabase.functions.invoke('mcp_status', { headers: auth, body: { id: sid } }), id);
  out.list = await observe(supabase.functions.invoke('mcp_status', { headers: auth }));
  out.restart = await observe(
    supabase.functions.invoke('manage_mcp_server', { headers: auth, body: { instanceId: id, action: 'restart' } }),
  );
  out.badAction = await observe(
    supabase.functions.invoke('manage_mcp_server', { headers: auth, body: { instance_id: id, action: 'explode' } }),
  );
  // Without a user token supabase-js sends the anon key as the bearer: not a user, so 401.
  out.anonOnly = await observe(supabase.functions.invoke('mcp_status'));
  out.remove = await observe(
    supabase.functions.invoke('manage_mcp_server', { headers: auth, body: { instance_id: id, action: 'remove' } }),
  );
  // What a browser asks before invoke(): the headers supabase-js's own CORS helper lists.
  const preflight = await fetch(`${FUNCTIONS_URL}/deploy_mcp_server`, {
    method: 'OPTIONS',
    headers: {
      Origin: 'http://localhost:5173',
      'Access-Control-Request-Method': 'POST',
      'Access-Control-Request-Headers': 'apikey,authorization,content-type,x-client-info',
    },
  });
  out.preflight = {
    status: preflight.status,
    allowOrigin: preflight.headers.get('access-control-allow-origin'),
    allowHeaders: preflight.headers.get('access-control-allow-headers'),
    allowMethods: preflight.headers.get('access-control-allow-methods'),
    sdkHeaders: corsHeaders['Access-Control-Allow-Headers'],
  };
  return out;
}

const result = { functionsClient: await withFunctionsClient(), supabaseJs: await withSupabaseJs() };
process.stdout.write(JSON.stringify(result) + '\n');
