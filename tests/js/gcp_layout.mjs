// The web app's calls as docs/web-app.md writes them, against a server laid out like Google Cloud's
// `https://REGION-PROJECT.cloudfunctions.net/<name>` (the functions at `/<kebab name>`, deploy.sh's
// names), and the plan's deploy body sent verbatim through supabase-js. tests/test_supabase_js.py
// starts the server, runs this with the values below in the environment, and asserts on what it
// prints: one JSON object of observations on stdout.

import { FunctionsClient, FunctionsHttpError } from '@supabase/functions-js';
import { createClient } from '@supabase/supabase-js';
import { corsHeaders } from '@supabase/supabase-js/cors';
import ws from 'ws';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const FUNCTIONS_BASE = env('FUNCTIONS_BASE'); // what https://REGION-PROJECT.cloudfunctions.net is on Google Cloud
const SUPABASE_URL = env('SUPABASE_URL'); // serves <url>/functions/v1/<name>, as the local stack does
const ANON_KEY = env('SUPABASE_ANON_KEY');
const JWT = env('USER_JWT');
const TOOLBOX_ID = env('TOOLBOX_ID');
const ALLOWED_ORIGIN = env('ALLOWED_ORIGIN');
const OTHER_ORIGIN = env('OTHER_ORIGIN');
const NAMES = JSON.parse(env('FUNCTION_NAMES')); // {deploy, manage, status}: deploy.sh's service names
const suffix = Math.random().toString(16).slice(2, 8);

// The body the plan's MCPService.deployServer sends, verbatim.
const planBody = (name) => ({
  accountToolEnvironmentId: TOOLBOX_ID,
  toolCatalogId: '00000000-0000-0000-0000-000000000001',
  instanceNameOnToolbox: name,
  baseConfigOverrideJson: {
    mcpConfig: {
      dockerImage: 'mcp/everything:latest',
      transport: 'http',
      port: 8080,
      environmentVariables: { LOG_LEVEL: 'info' },
      capabilities: ['tools'],
      discoveryMetadata: { templateId: 'everything' },
    },
  },
});

// In a browser the Origin header is the page's; here it is set on every request, as a browser would.
const fromOrigin = (origin) => (input, init = {}) => {
  const headers = new Headers(init.headers);
  headers.set('Origin', origin);
  return fetch(input, { ...init, headers });
};

async function observe(promise) {
  const { data, error, response } = await promise;
  const seen = {
    status: response ? response.status : null,
    allowOrigin: response ? response.headers.get('access-control-allow-origin') : null,
    error: null,
    data,
  };
  if (error) {
    seen.error = { name: error.name, isHttpError: error instanceof FunctionsHttpError, message: error.message };
    if (error instanceof FunctionsHttpError) {
      // docs/web-app.md "Errors": the body of every refusal is {error: {code, message, details}}.
      seen.error.contextStatus = error.context.status;
      seen.error.body = await error.context.json();
    }
  }
  return seen;
}

async function untilSettled(functions, id) {
  for (let i = 0; i < 150; i += 1) {
    const seen = await observe(functions.invoke(NAMES.status, { body: { id } }));
    const status = seen.data && seen.data.server && seen.data.server.status;
    if (status && status !== 'deploying' && status !== 'pending_deploy') return seen;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return observe(functions.invoke(NAMES.status, { body: { id } }));
}

// docs/web-app.md "On Google Cloud": one FunctionsClient for the project's functions, its token kept
// current by the auth state (here, the signed-in user's access token, set as onAuthStateChange would).
async function onGoogleCloudLayout() {
  const functions = new FunctionsClient(FUNCTIONS_BASE, {
    headers: { apikey: ANON_KEY },
    customFetch: fromOrigin(ALLOWED_ORIGIN),
  });
  functions.setAuth(JWT);
  const out = {};
  out.deploy = await observe(functions.invoke(NAMES.deploy, { body: planBody(`Weather API Server ${suffix}`) }));
  const id = out.deploy.data && out.deploy.data.id;
  out.settled = await untilSettled(functions, id);
  out.list = await observe(functions.invoke(NAMES.status, { method: 'GET' }));
  out.badName = await observe(
    functions.invoke(NAMES.deploy, { body: { toolbox_id: TOOLBOX_ID, name: 'Météo/Server #1' } }),
  );
  out.taken = await observe(functions.invoke(NAMES.deploy, { body: planBody(`Weather API Server ${suffix}`) }));
  out.stop = await observe(functions.invoke(NAMES.manage, { body: { instance_id: id, action: 'stop' } }));
  out.remove = await observe(functions.invoke(NAMES.manage, { body: { instance_id: id, action: 'remove' } }));
  // The same call from a page whose origin is not allowed: answered, but without the header a
  // browser needs to hand the answer to the page.
  const elsewhere = new FunctionsClient(FUNCTIONS_BASE, {
    headers: { apikey: ANON_KEY },
    customFetch: fromOrigin(OTHER_ORIGIN),
  });
  elsewhere.setAuth(JWT);
  out.otherOrigin = await observe(elsewhere.invoke(NAMES.status, { method: 'GET' }));
  return out;
}

// What a browser asks before each call: the headers supabase-js's own CORS helper lists.
async function preflight(origin) {
  const response = await fetch(`${FUNCTIONS_BASE}/${NAMES.deploy}`, {
    method: 'OPTIONS',
    headers: {
      Origin: origin,
      'Access-Control-Request-Method': 'POST',
      'Access-Control-Request-Headers': 'apikey,authorization,content-type,x-client-info',
    },
  });
  return {
    status: response.status,
    allowOrigin: response.headers.get('access-control-allow-origin'),
    allowHeaders: response.headers.get('access-control-allow-headers'),
    allowMethods: response.headers.get('access-control-allow-methods'),
    vary: response.headers.get('vary'),
    sdkHeaders: corsHeaders['Access-Control-Allow-Headers'],
  };
}

// Locally (./deploy.sh local) supabase.functions.invoke reaches <SUPABASE_URL>/functions/v1/<name>:
// the plan's body, verbatim.
async function planBodyThroughSupabaseJs() {
  const supabase = createClient(SUPABASE_URL, ANON_KEY, {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    realtime: { transport: ws },
  });
  const headers = { Authorization: `Bearer ${JWT}` };
  const out = {};
  out.deploy = await observe(
    supabase.functions.invoke('deploy_mcp_server', { headers, body: planBody(`Météo/Server #${suffix}`) }),
  );
  const id = out.deploy.data && out.deploy.data.id;
  for (let i = 0; i < 150; i += 1) {
    out.settled = await observe(supabase.functions.invoke('mcp_status', { headers, body: { id } }));
    const status = out.settled.data && out.settled.data.server && out.settled.data.server.status;
    if (status && status !== 'deploying' && status !== 'pending_deploy') break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  out.mixed = await observe(
    supabase.functions.invoke('deploy_mcp_server', {
      headers,
      body: { ...planBody('x'), image: 'mcp/everything:latest' },
    }),
  );
  out.remove = await observe(
    supabase.functions.invoke('manage_mcp_server', { headers, body: { instance_id: id, action: 'remove' } }),
  );
  return out;
}

const result = {
  gcp: await onGoogleCloudLayout(),
  preflightAllowed: await preflight(ALLOWED_ORIGIN),
  preflightOther: await preflight(OTHER_ORIGIN),
  supabaseJs: await planBodyThroughSupabaseJs(),
};
process.stdout.write(JSON.stringify(result) + '\n');
